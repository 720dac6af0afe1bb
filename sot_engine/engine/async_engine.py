"""The engine behind an event loop: one thread owns the `LLMEngine`, coroutines talk to it.

The engine is single-threaded by design (nano-vllm style), so every call into it runs on the engine
thread: requests arrive as commands, which the thread applies at the start of every step (`before_step`
hook), so a request joins the running batch at the next step whoever is driving the loop -- the thread's
own loop, or a synchronous job such as the SoT driver that steps the engine itself. Tokens go back to each
request's asyncio queue as the steps produce them (`after_step` hook). Dropping a request's stream (a client
that disconnects) aborts it and frees its blocks at the next step.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator, TypeVar

from sot_engine.engine.llm import RequestOutput
from sot_engine.engine.llm_engine import LLMEngine, StepOutput
from sot_engine.engine.sequence import SamplingParams

T = TypeVar("T")


@dataclass(slots=True)
class Delta:
    """New output of one request since its last delta; the last one carries the whole output."""
    text: str
    token_ids: list[int]
    finished: bool
    output: RequestOutput | None = None


class EngineDead(RuntimeError):
    """The engine thread stopped (shutdown, or a step raised): nothing more will be produced."""


class _Channel:
    """A request's queue on the event loop, fed from the engine thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, item: Delta | BaseException | Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._channels: dict[str, _Channel] = {}  # request id -> its queue; touched by the engine thread only
        self._deadlines: dict[str, float] = {}  # request id -> time.monotonic() when it is cut off
        self._wake = threading.Event()
        self._stopped = False
        self._error: BaseException | None = None
        self._next_id = 0
        self._id_lock = threading.Lock()
        engine.step_hooks.append(self)
        self._thread = threading.Thread(target=self._loop, name="sot-engine", daemon=True)
        self._thread.start()

    # ---- called from the event loop -------------------------------------------------------------
    def new_id(self, prefix: str) -> str:
        with self._id_lock:
            self._next_id += 1
            return f"{prefix}-{self._next_id}"

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between two steps; its result or exception comes back here."""
        fut: Future = Future()

        def run() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # noqa: BLE001 -- handed to the caller
                    fut.set_exception(e)
        self._submit(self._commands, run)
        return await asyncio.wrap_future(fut)

    def waiting(self) -> int:
        """Requests queued and not yet admitted, SoT jobs included (read from any thread: an estimate)."""
        return len(self.engine.scheduler.waiting) + self._jobs.qsize()

    async def generate(self, ids: list[int], params: SamplingParams, request_id: str | None = None,
                       deadline: float | None = None) -> AsyncIterator[Delta]:
        """Stream one request. The request is queued (and checked: ValueError) before the first delta; leaving
        the iteration early -- a disconnected client -- aborts it. At `deadline` (time.monotonic()) it ends
        where it is, finish_reason "length" and stop_reason "timeout", its blocks freed."""
        rid = request_id or self.new_id("req")
        channel = _Channel(asyncio.get_running_loop())

        def add() -> None:
            self.engine.add_request(ids, params, request_id=rid)
            self._channels[rid] = channel
            if deadline is not None:
                self._deadlines[rid] = deadline
        await self.call(add)
        return self._drain(rid, channel)

    async def _drain(self, rid: str, channel: _Channel) -> AsyncIterator[Delta]:
        done = False
        try:
            while not done:
                item = await channel.queue.get()
                if isinstance(item, BaseException):
                    raise item
                done = item.finished
                yield item
        finally:
            if not done:
                self._submit(self._commands, lambda: self._abort(rid))

    async def run_job(self, job: Callable[[Callable[[Any], None]], None],
                      deadline: float | None = None) -> AsyncIterator[Any]:
        """Run a synchronous `job(emit)` on the engine thread (it may step the engine; other requests keep
        running in its steps) and iterate what it emits. Jobs run one at a time. Leaving the iteration early
        asks the job to stop: `emit` then raises `GeneratorExit` inside it. Past `deadline` `emit` raises
        `TimeoutError` in the job, and the iteration raises it."""
        channel = _Channel(asyncio.get_running_loop())
        cancelled = threading.Event()
        end = object()

        def emit(item: Any) -> None:
            if cancelled.is_set():
                raise GeneratorExit("the client went away")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("the request ran past the server's --request-timeout")
            channel.put(item)

        def run() -> None:
            try:
                if not cancelled.is_set():
                    job(emit)
            except GeneratorExit:
                pass
            except BaseException as e:  # noqa: BLE001 -- handed to the caller
                channel.put(e)
            channel.put(end)

        self._submit(self._jobs, run)

        async def items() -> AsyncIterator[Any]:
            try:
                while True:
                    item = await channel.queue.get()
                    if item is end:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                cancelled.set()
        return items()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=30)

    def _submit(self, q: queue.SimpleQueue, fn: Callable[[], None]) -> None:
        if self._stopped or self._error is not None:
            raise EngineDead(f"the engine has stopped{': ' + repr(self._error) if self._error else ''}")
        q.put(fn)
        self._wake.set()

    # ---- the engine thread ----------------------------------------------------------------------
    def before_step(self) -> None:
        while True:
            try:
                self._commands.get_nowait()()
            except queue.Empty:
                break
        if self._deadlines:
            now = time.monotonic()
            for rid in [r for r, t in self._deadlines.items() if t <= now]:
                self._time_out(rid)

    def _time_out(self, rid: str) -> None:
        """End a request that ran out of time as if max_tokens had come: what it has is its answer."""
        del self._deadlines[rid]
        channel, seq = self._channels.pop(rid, None), self.engine.requests.get(rid)
        if channel is None or seq is None:
            return
        self.engine.abort(rid)
        seq.finish_reason, seq.stop_reason = "length", "timeout"
        channel.put(Delta("", [], True, RequestOutput.of(seq)))
        self.engine.release(seq)

    def after_step(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            channel = self._channels.get(out.seq.request_id)
            if channel is None:
                continue  # someone else's request (the SoT job reads its own outputs)
            full = RequestOutput.of(out.seq) if out.finished else None
            channel.put(Delta(out.new_text, out.new_token_ids, out.finished, full))
            if out.finished:
                del self._channels[out.seq.request_id]
                self._deadlines.pop(out.seq.request_id, None)
                self.engine.release(out.seq)

    def _abort(self, rid: str) -> None:
        self._deadlines.pop(rid, None)
        if self._channels.pop(rid, None) is None:
            return
        seq = self.engine.requests.get(rid)
        if seq is not None:
            self.engine.abort(rid)
            self.engine.release(seq)

    def _loop(self) -> None:
        while not self._stopped:
            self.before_step()
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                job = None
            if job is not None:
                job()  # steps the engine itself; the hooks keep serving everyone else meanwhile
            elif self.engine.has_unfinished():
                try:
                    self.engine.step()
                except Exception as e:  # noqa: BLE001 -- never seen; fail loudly, keep serving the next ones
                    self._fail_all(e)
            else:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
        self._fail_all(EngineDead("the engine was shut down"))

    def _fail_all(self, e: BaseException) -> None:
        """A step raised: every open request gets the error and is aborted, so the pool is whole again."""
        err = e if isinstance(e, EngineDead) else EngineDead(f"the engine failed: {type(e).__name__}: {e}")
        for rid, channel in list(self._channels.items()):
            channel.put(err)
            self._abort(rid)


def iterate(it: Iterator[T], emit: Callable[[T], None]) -> None:
    """Feed a synchronous iterator's items to a job's `emit`, closing it if `emit` says stop."""
    try:
        for item in it:
            emit(item)
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
