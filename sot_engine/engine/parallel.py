"""Tensor parallelism over torch.distributed (Megatron-style): gloo on CPUs, NCCL on GPUs.

Rank 0 is the driver: it runs the scheduler, block manager, prefix cache, sampler and everything above, and
its own shard of the model. Workers (ranks 1..N-1) only run the model. Each step the driver's runner sends the
step's flat inputs (ids, positions, attention metadata) in one message; every rank runs its shard of every
layer, and two all-reduces per layer (after o_proj, after down_proj) make the residual stream whole again on
all ranks. Only the driver computes logits.

Sharding (`shard_spec`): q/k/v by whole KV-head groups (GQA intact: rank r holds kv heads [r*K/N, (r+1)*K/N)
and the q heads that read them), o_proj by the same columns, gate/up by rows of the intermediate size, down by
its columns. The embedding is whole on every rank (each needs every row of it); lm_head only on the driver.
Each rank's KV pool holds only its own KV heads. Loaders read only the slice a rank needs (safetensors
`get_slice`, GGUF bytes sliced before dequantizing), so no rank holds a whole matrix it needs a shard of.

Workers are spawned as local processes (`Workers`), or started by torchrun (`from_torchrun`): every rank runs
the same program, and ranks > 0 turn into workers inside `LLMEngine(...)` and exit when the driver stops.
"""
from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from sot_engine.engine.config import ModelConfig

SKIP = "skip"  # shard_spec: this rank does not load the tensor at all


class TensorParallelError(RuntimeError):
    """A worker died, hung or failed: the engine cannot go on (its requests are lost, never wrong)."""


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1
    vocab_head: bool = False  # lm_head split over the vocabulary (logits all-gathered) instead of whole on rank 0

    def part(self, n: int) -> tuple[int, int]:
        per = n // self.world
        return self.rank * per, (self.rank + 1) * per


def check_shardable(cfg: ModelConfig, world: int, vocab_head: bool = False) -> None:
    for what, n in (("KV heads", cfg.num_kv_heads), ("attention heads", cfg.num_heads),
                    ("the intermediate size", cfg.intermediate_size)) + ((("the vocabulary", cfg.vocab_size),)
                                                                         if vocab_head else ()):
        if n % world:
            raise ValueError(f"tensor_parallel_size={world} does not divide {what} ({n}): GQA groups and MLP "
                             "rows are split whole")


def shard_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """The config one rank's shard looks like (its heads, its part of the MLP)."""
    check_shardable(cfg, world)
    return replace(cfg, num_heads=cfg.num_heads // world, num_kv_heads=cfg.num_kv_heads // world,
                   intermediate_size=cfg.intermediate_size // world)


def shard_spec(name: str, cfg: ModelConfig, shard: Shard) -> tuple[int, int, int] | str | None:
    """(dim, start, stop) of the slice of weight `name` that `shard` holds, None for all of it, SKIP for none."""
    if shard.world == 1:
        return None
    d = cfg.head_dim
    if name.endswith(("self_attn.q_proj.weight", "self_attn.o_proj.weight")):
        a, b = shard.part(cfg.num_heads)
        return (0 if "q_proj" in name else 1), a * d, b * d
    if name.endswith("self_attn.q_proj.bias"):
        a, b = shard.part(cfg.num_heads)
        return 0, a * d, b * d
    if name.endswith(("self_attn.k_proj.bias", "self_attn.v_proj.bias")):
        a, b = shard.part(cfg.num_kv_heads)
        return 0, a * d, b * d
    if name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
        a, b = shard.part(cfg.num_kv_heads)
        return 0, a * d, b * d
    if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")):
        a, b = shard.part(cfg.intermediate_size)
        return (1 if "down_proj" in name else 0), a, b
    if name == "lm_head.weight" and shard.vocab_head:
        return (0, *shard.part(cfg.vocab_size))
    if name == "lm_head.weight" and shard.rank:
        return SKIP
    return None


def take(t: torch.Tensor, spec: tuple[int, int, int] | None) -> torch.Tensor:
    return t if spec is None else t.narrow(spec[0], spec[1], spec[2] - spec[1])


# ---- the process group ---------------------------------------------------------------------------------
class Group:
    """One rank's view of the TP group: `all_reduce` (NCCL on CUDA, else gloo) for activations and, over gloo
    always, `send` / `recv` of one pickled message per step from the driver."""

    def __init__(self, host: str, port: int, rank: int, world: int, device: torch.device, timeout: float) -> None:
        self.rank, self.world, self.device = rank, world, device
        self.timeout = timedelta(seconds=timeout)
        self.store = dist.TCPStore(host, port, world, rank == 0, timeout=self.timeout, wait_for_workers=False)
        self.cpu = dist.ProcessGroupGloo(dist.PrefixStore("cpu", self.store), rank, world, self.timeout)
        if device.type == "cuda":
            self.dev = dist.ProcessGroupNCCL(dist.PrefixStore("nccl", self.store), rank, world)
        else:
            self.dev = self.cpu
        self.on_error = None  # the driver's: turns a failed collective into a message naming the worker

    def _fail(self, e: BaseException) -> TensorParallelError:
        why = self.on_error() if self.on_error is not None else ""
        return TensorParallelError(f"tensor parallelism failed on rank {self.rank}: {type(e).__name__}: {e}"
                                   + (f"; {why}" if why else ""))

    def all_reduce(self, t: torch.Tensor) -> None:
        try:
            self.dev.allreduce([t]).wait(self.timeout)
        except RuntimeError as e:
            raise self._fail(e) from None

    def _broadcast(self, t: torch.Tensor, wait: timedelta | None = None) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.cpu.broadcast([t], opts).wait(wait or self.timeout)

    def send(self, msg: Any) -> None:
        """Driver: one message to every worker."""
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self._broadcast(torch.tensor([len(data)], dtype=torch.int64))
            self._broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        except RuntimeError as e:
            raise self._fail(e) from None

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t`, concatenated along the last dim in rank order (vocabulary-split logits)."""
        parts = [torch.empty_like(t) for _ in range(self.world)]
        try:
            self.dev.allgather([parts], [t.contiguous()]).wait(self.timeout)
        except RuntimeError as e:
            raise self._fail(e) from None
        return torch.cat(parts, dim=-1)

    def ack(self) -> None:
        """The last collective: every rank has its `stop` before any tears its group down."""
        self.cpu.allreduce([torch.zeros(1)]).wait(self.timeout)

    def close(self) -> None:
        """Tear the groups down while the interpreter is whole (a gloo group left to the exit can abort it)."""
        for pg in {id(self.dev): self.dev, id(self.cpu): self.cpu}.values():
            try:
                pg.shutdown()
            except RuntimeError:
                pass
        self.dev = self.cpu = self.store = None

    def recv(self) -> Any:
        """Worker: the driver's next message (waits as long as the driver is alive and idle)."""
        n = torch.zeros(1, dtype=torch.int64)
        self._broadcast(n, wait=timedelta(days=365))
        buf = torch.empty(int(n), dtype=torch.uint8)
        self._broadcast(buf)
        return pickle.loads(buf.numpy().tobytes())


# ---- workers ---------------------------------------------------------------------------------------------
@dataclass
class WorkerSpec:
    """What a worker needs to build its shard: the driver's engine arguments, resolved. The pool's size comes
    after, in the driver's first message (it depends on the loaded config)."""
    model: str
    dtype: torch.dtype
    device_type: str
    backend: str | None
    seed: int
    weight_dtype: str | None
    matmul_precision: str
    kv_dtype: torch.dtype
    block_size: int
    threads: int
    timeout: float
    vocab_head: bool = False


def _device(spec: WorkerSpec, rank: int) -> torch.device:
    return torch.device("cuda", rank) if spec.device_type == "cuda" else torch.device("cpu")


def _serve(group: Group, spec: WorkerSpec) -> None:
    from sot_engine.engine.kv_cache import KVCache
    from sot_engine.engine.loader import load_model
    from sot_engine.engine.model import LlamaModel
    from sot_engine.kernels import get_backend
    device = group.device
    if device.type == "cpu":
        torch.set_num_threads(spec.threads)
    shard = Shard(group.rank, group.world, spec.vocab_head)
    loaded = load_model(spec.model, dtype=spec.dtype, device=device, seed=spec.seed, shard=shard,
                        keep_quantized=spec.weight_dtype == "gguf")
    cfg = shard_config(loaded.config, group.world)
    model = LlamaModel(cfg, loaded.weights, get_backend(spec.backend, device), spec.weight_dtype,
                       spec.matmul_precision, group=group,
                       vocab_part=shard.part(loaded.config.vocab_size) if spec.vocab_head else None)
    kind, num_blocks = group.recv()
    assert kind == "init", kind
    kv = KVCache(cfg, num_blocks, spec.block_size, spec.kv_dtype, device)
    with torch.inference_mode():
        while True:
            msg = group.recv()
            if msg[0] == "step":
                _, ids, positions, meta = msg
                meta = meta.to(device)
                hidden = model.forward(ids.to(device), positions.to(device), meta, kv.layers)
                if model.vocab_part is not None:  # its slice of the logits, for the driver's all-gather
                    model.logits(hidden, meta)
            elif msg[0] == "copy":
                kv.copy_blocks(msg[1])
            elif msg[0] == "stop":
                group.ack()
                group.close()
                return
            elif msg[0] == "fail":  # tests: a worker that dies mid-run
                os._exit(3)


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the driver process dies, however it dies (PR_SET_PDEATHSIG)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # elsewhere the dead driver's closed sockets end the worker's next receive


def worker_entry() -> None:
    """`python -c '...worker_entry()' RANK WORLD HOST PORT` with the pickled WorkerSpec on stdin: a worker started
    as a fresh interpreter, so the driver's own script is never imported again (no `if __name__ == "__main__"`
    guard needed, notebooks work)."""
    _die_with_parent()
    rank, world, host, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    worker_main(rank, world, host, port, pickle.loads(sys.stdin.buffer.read()))


def worker_main(rank: int, world: int, host: str, port: int, spec: WorkerSpec) -> None:
    """A worker process: Ctrl-C is the driver's to handle (it stops the workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        device = _device(spec, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        _serve(Group(host, port, rank, world, device, spec.timeout), spec)
    except BaseException:  # noqa: BLE001 -- the driver sees the collective fail; the reason goes to stderr
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env() -> tuple[int, int, str, int] | None:
    """(rank, world, master address, port) when started by torchrun, else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return None
    return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]))


class Worker:
    """One worker process, with the few things the driver asks of it."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen, self.pid = popen, popen.pid

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        self.popen.kill()


class Workers:
    """The driver's side: starts (or, under torchrun, meets) the workers, and stops them. A worker that exits
    or stops answering makes the next collective raise `TensorParallelError` naming it, within `timeout`."""

    def __init__(self, world: int, spec: WorkerSpec, device: torch.device) -> None:
        self.world, self.procs = world, []
        env = torchrun_env()
        if env is not None:  # torchrun started every rank: this is rank 0, the others wait in `serve_torchrun`
            rank, size, host, port = env
            if size != world:
                raise ValueError(f"tensor_parallel_size={world} but torchrun started {size} processes")
            # the store takes torchrun's port + 1: torchrun's own rendezvous store holds MASTER_PORT
            self.group = Group(host, port + 1, 0, world, device, spec.timeout)
        else:
            port = _free_port()
            code = "from sot_engine.engine.parallel import worker_entry; worker_entry()"
            for rank in range(1, world):
                p = subprocess.Popen([sys.executable, "-c", code, str(rank), str(world), "127.0.0.1", str(port)],
                                     stdin=subprocess.PIPE)
                p.stdin.write(pickle.dumps(spec))
                p.stdin.close()
                self.procs.append(Worker(p))
            try:
                self.group = Group("127.0.0.1", port, 0, world, device, spec.timeout)
            except Exception as e:  # noqa: BLE001 -- a worker that could not start
                self.close()
                raise TensorParallelError(f"tensor-parallel workers did not start: {e}; {self.describe()}") from None
        self.group.on_error = self.describe
        self.closed = False

    def describe(self) -> str:
        dead = [f"worker {i + 1} exited with code {p.exitcode}" for i, p in enumerate(self.procs)
                if not p.is_alive()]
        return ", ".join(dead) if dead else "no worker process has exited (a hang, or a worker on another host)"

    def send(self, msg: Any) -> None:
        self.group.send(msg)

    def kill_one(self) -> None:
        """Tests: make worker 1 exit at its next message, as a crash would."""
        self.group.send(("fail",))

    def close(self) -> None:
        """Stop the workers (a `stop` message, then terminate what is left): no orphan processes."""
        if getattr(self, "closed", False):
            return
        self.closed = True
        group = getattr(self, "group", None)
        if group is not None and all(p.is_alive() for p in self.procs):
            try:
                group.send(("stop",))
                group.ack()
            except (TensorParallelError, RuntimeError):
                pass
        if group is not None:
            group.close()
        deadline = time.monotonic() + 10
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)


def serve_torchrun(spec: WorkerSpec) -> None:
    """Ranks > 0 under torchrun: serve as a worker until the driver stops, then exit the process."""
    rank, world, host, port = torchrun_env()
    _serve(Group(host, port + 1, rank, world, _device(spec, rank), spec.timeout), spec)
    sys.exit(0)
