"""The engine loop: requests in, one batched forward per step, tokens out.

`add_request` validates everything up front (a bad request raises and changes nothing), `step`
runs one prefill or decode batch, samples, applies stop rules and frees a finished sequence's
blocks in the same step. `add_fork` prefills a shared prefix once and lets N children continue
from it.
"""
from __future__ import annotations

import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Protocol

import torch

from sot_engine.engine.config import CacheConfig, SchedulerConfig
from sot_engine.engine.guided import GuidedDecoder, Matcher
from sot_engine.engine.kv_cache import BlockManager, KVCache, PoolExhausted
from sot_engine.engine.loader import load_model
from sot_engine.engine.model import LlamaModel
from sot_engine.engine.parallel import Shard, WorkerSpec, Workers, serve_torchrun, shard_config, torchrun_env
from sot_engine.engine.runner import ModelRunner
from sot_engine.engine.sampler import sample
from sot_engine.engine.scheduler import Scheduler
from sot_engine.engine.sequence import SamplingParams, Sequence, Status, expand_params
from sot_engine.engine.tokenizer import DecodeState
from sot_engine.kernels import get_backend
from sot_engine.kernels.weights import check_weight_dtype

Prompt = str | list[int] | list[dict]


class StepHook(Protocol):
    def before_step(self) -> None: ...
    def after_step(self, outputs: list["StepOutput"]) -> None: ...


@dataclass(slots=True)
class StepOutput:
    """What one step did to one sequence (the unit of streaming)."""
    seq: Sequence
    new_token_ids: list[int]
    new_text: str
    finished: bool


def physical_cores() -> int:
    """Cores, not hyper-threads: a second thread per core only slows the matmuls down."""
    cpus = os.sched_getaffinity(0)
    cores = set()
    for c in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(c))
    return max(1, len(cores))


KV_CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # LLMEngine(kv_cache_dtype=...)


def default_kv_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.85)
    return 2 << 30


@dataclass(slots=True)
class _Detok:
    """A request's output text so far (decoded incrementally) and how much of it was emitted (never taken back)."""
    decoded: DecodeState = field(default_factory=DecodeState)
    emitted: int = 0
    stop_scan_from: int = 0


def _check_after(p: SamplingParams) -> bool:
    """May this row's grammar be checked on its sampled token instead of masking first (see `step`)?"""
    return p.greedy or (p.top_k in (0, -1) and p.top_p >= 1.0)


def _unicode(text: str, what: str) -> str:
    """`text` if it can be encoded (JSON can carry a lone surrogate like \\ud800, which no tokenizer takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode: {e.reason} at character {e.start}") from None
    return text


class LLMEngine:
    def __init__(self, model: str = "default", *, device: str | torch.device | None = None,
                 dtype: torch.dtype | str | None = None, backend: str | None = None,
                 block_size: int = 16, num_blocks: int | None = None, kv_cache_memory: int | None = None,
                 max_num_seqs: int = 64, max_num_batched_tokens: int | None = None,
                 max_model_len: int | None = None, seed: int = 0, num_threads: int | None = None,
                 cascade: str = "auto", enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                 weight_dtype: str | None = None, matmul_precision: str = "fp32",
                 kv_cache_dtype: str | None = None, tensor_parallel_size: int = 1,
                 tensor_parallel_timeout: float = 60.0, tensor_parallel_lm_head: str = "whole") -> None:
        """`cascade`: shared-prefix decode attention for sequences that share prefix blocks (fork children, SoT
        points). "auto": on CUDA, for the groups the cost model accepts (`kernels.cascade.cascade_pays`);
        "on": for every group found (tests); "off": never. On the CPU the C++ decode attention finds the groups
        itself, from the block tables, and reads a prefix of 256+ tokens once for its group (csrc/cpu/attention.cpp).

        `enable_prefix_caching`: a request whose prompt starts with full blocks already computed (a system
        prompt, SoT's question + skeleton sent again) takes their KV from the pool instead of prefilling it;
        freed blocks stay cached until the pool needs them. Exact, hence on by default.

        `weight_dtype`: storage of the weight matrices and the embedding, "fp32" | "bf16" | "int8" (a scale per
        32 weights); products and sums stay in `dtype`. None: stored in `dtype`. `matmul_precision`: "fp32", or "bf16"
        (bf16 weights, and the matmuls round their activations to bf16: on a CPU with AMX a decode step of up to
        16 rows then costs about what one row does), or "int8" (int8 weights, and the matmuls quantize their
        activations per 32 values too: integer dot products, llama.cpp's Q8_0 x Q8_0). "gguf": a GGUF file's own
        quantized types (Q8_0, Q5_0, Q6_K as int8; Q4_0, Q4_1, Q4_K as 4-bit; `loader.repack`), at int8 precision;
        the default SmolLM2 then takes 112 MB instead of 538. See `kernels.weights`.

        `enable_chunked_prefill` (vLLM's name and default): a step decodes one token for every running sequence
        and spends the rest of `max_num_batched_tokens` (None: 512 on a CPU, 4096 on a GPU) on prompts, cutting
        a long one into chunks over several steps, so the streams already running keep their pace while it is
        prefilled; the logits are those of an unchunked run. Off: a step is all prefill or all decode.

        `tensor_parallel_size` N > 1: the model is split over N processes (engine.parallel): this one (the
        driver, rank 0) and N-1 workers it spawns (gloo on a CPU, where the cores are divided between them; NCCL on
        GPUs 0..N-1), or that torchrun started, in which case `LLMEngine(...)` on ranks > 0 serves as a worker and
        exits the process when the driver stops. A worker that dies or hangs makes the step raise
        `TensorParallelError` within `tensor_parallel_timeout` seconds. `close()` (or exit) stops them.
        `tensor_parallel_lm_head`: "whole" (on the driver; the default, measured faster on a CPU) or "vocab" (split
        over the vocabulary on every rank, the logits all-gathered).

        `kv_cache_dtype`: the K/V pool's dtype, "fp32" | "bf16" (None: `dtype`). On CPU a bf16 pool under float32
        activations halves the KV memory and the bytes decode attention reads (K/V rounded once when stored, then
        widened exactly; products and sums float32). Elsewhere it must be `dtype` itself."""
        if cascade not in ("auto", "on", "off"):
            raise ValueError(f"cascade must be 'auto', 'on' or 'off', got {cascade!r}")
        tp = tensor_parallel_size
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
        if tensor_parallel_lm_head not in ("whole", "vocab"):
            raise ValueError(f"tensor_parallel_lm_head must be 'whole' or 'vocab', got {tensor_parallel_lm_head!r}")
        vocab_head = tp > 1 and tensor_parallel_lm_head == "vocab"
        for name, v in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.weight_dtype = check_weight_dtype(weight_dtype, matmul_precision)  # before the (slow) load
        self.matmul_precision = matmul_precision
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.dtype = dtype or (torch.float32 if self.device.type == "cpu" else torch.bfloat16)
        self.kv_dtype = self._kv_dtype(kv_cache_dtype)
        self.workers: Workers | None = None
        threads = max(1, (num_threads or physical_cores()) // tp)  # on a CPU the cores are divided between ranks
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        spec = WorkerSpec(model, self.dtype, self.device.type, backend, seed, self.weight_dtype, matmul_precision,
                          self.kv_dtype, block_size, threads, tensor_parallel_timeout, vocab_head) if tp > 1 else None
        if tp > 1 and (env := torchrun_env()) is not None and env[0] > 0:
            serve_torchrun(spec)  # a torchrun worker: runs the driver's steps, then exits the process
        if tp > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", 0)
        shard = Shard(0, tp, vocab_head)
        loaded = load_model(model, dtype=self.dtype, device=self.device, seed=seed, shard=shard,
                            keep_quantized=self.weight_dtype == "gguf")
        self.model_name, self.config = loaded.name, loaded.config
        local = shard_config(self.config, tp) if tp > 1 else self.config  # this rank's heads and MLP rows
        self.tokenizer, self.chat_template = loaded.tokenizer, loaded.chat_template
        self.backend = get_backend(backend, self.device)
        self.model = LlamaModel(local, loaded.weights, self.backend, self.weight_dtype, matmul_precision,
                                vocab_part=shard.part(self.config.vocab_size) if vocab_head else None)
        self.max_model_len = min(max_model_len or self.config.max_position_embeddings,
                                 self.config.max_position_embeddings)
        self.cache_cfg = CacheConfig(block_size=block_size, num_blocks=num_blocks,
                                     memory_budget_bytes=kv_cache_memory)
        if num_blocks is None:
            budget = kv_cache_memory or default_kv_budget(self.device)
            per_block = KVCache.bytes_per_block(local, block_size, self.kv_dtype)  # this rank's KV heads
            enough = max_num_seqs * -(-self.max_model_len // block_size)  # no use for more
            num_blocks = min(budget // per_block, enough)
            if num_blocks < 1:
                raise ValueError(f"KV cache budget of {budget} bytes is below one block ({per_block} bytes)")
        self.block_manager = BlockManager(num_blocks, block_size, enable_caching=enable_prefix_caching)
        self.kv_cache = KVCache(local, num_blocks, block_size, self.kv_dtype, self.device)
        if max_num_batched_tokens is None:
            max_num_batched_tokens = 512 if self.device.type == "cpu" else 4096
        if enable_chunked_prefill and max_num_batched_tokens <= max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must exceed max_num_seqs "
                             f"({max_num_seqs}) with chunked prefill: the decodes alone could spend the whole budget")
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs, max_num_batched_tokens, self.max_model_len,
                                                   enable_chunked_prefill), self.block_manager)
        if (cascade == "auto" and self.device.type != "cuda") or tp > 1:
            cascade = "off"  # the torch path's gathers cost more than they save; the C++ path does its own
        if tp > 1:
            self.workers = Workers(tp, spec, self.device)
            self._finalizer = weakref.finalize(self, self.workers.close)  # and at exit: no orphan workers
            self.model.group = self.workers.group
            self.workers.send(("init", num_blocks))
        self.runner = ModelRunner(self.model, self.kv_cache, block_size, self.device, cascade=cascade,
                                  workers=self.workers)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.eos_ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        # structured output; the grammar library is loaded by the first guided request
        self.guided = GuidedDecoder(self.tokenizer, self.eos_ids, self.config.vocab_size)
        self._matchers: dict[int, Matcher] = {}  # seq_id -> grammar state, for guided sequences
        self.requests: dict[str, Sequence] = {}
        self._forks: dict[int, tuple[Sequence, list[Sequence]]] = {}  # parent seq_id -> (parent, children)
        self._detok: dict[int, _Detok] = {}
        self._next_request = 0
        # cumulative work done, for benchmarks and for checking that a shared prefix was computed once
        self.counters = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "prefix_cache_hit_tokens": 0}
        self.max_decode_batch = 0  # the most sequences one decode step has run (did parallel requests batch?)
        # observers of every step, whoever drives the loop (the async server loop sees the steps a
        # synchronous caller such as the SoT driver runs): before_step() then after_step(outputs)
        self.step_hooks: list[StepHook] = []

    def _kv_dtype(self, name: str | None) -> torch.dtype:
        """The pool dtype `kv_cache_dtype` names (checked before the slow load)."""
        if name is not None and name not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)} (or None: the compute "
                             f"dtype), got {name!r}")
        kv = KV_CACHE_DTYPES[name] if name else self.dtype
        if kv != self.dtype and (self.device.type != "cpu" or kv.itemsize > self.dtype.itemsize):
            raise ValueError(f"kv_cache_dtype={name!r} with dtype {self.dtype}: the pool may be narrower than the "
                             "activations on CPU only, and never wider")
        return kv

    # ---- input ---------------------------------------------------------------------------------

    def encode(self, prompt: Prompt, add_bos: bool = True) -> list[int]:
        """A string (tokenized, BOS as the model wants unless `add_bos` is off, as for a suffix
        that continues another prompt), token ids, or chat messages."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer (random weights): pass token ids")
            ids = self.tokenizer.encode(_unicode(prompt, "the prompt"))
            if add_bos and self.tokenizer.add_bos and self.tokenizer.bos_token_id is not None and prompt:
                ids = [self.tokenizer.bos_token_id] + ids
            return ids
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            if self.tokenizer is None or self.chat_template is None:
                raise ValueError("chat messages need a model with a tokenizer and a chat template")
            for m in prompt:
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise ValueError(f"bad chat message {m!r}: needs string 'role' and 'content'")
            text = _unicode(self.chat_template.render(prompt), "a chat message")
            return self.tokenizer.encode(text, add_special_tokens=False)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise ValueError(f"a prompt must be a string, a list of token ids or a list of chat messages, "
                         f"got {type(prompt).__name__}")

    def check(self, prompt: Prompt, params: SamplingParams) -> list[int]:
        """The prompt's token ids if the request can run; ValueError naming the problem if not."""
        ids = self.encode(prompt)
        self._validate(ids, params)
        return ids

    def _validate(self, ids: list[int], params: SamplingParams, what: str = "prompt") -> None:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"expected SamplingParams, got {type(params).__name__}")
        if not ids:
            raise ValueError(f"empty {what}: nothing to condition on")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"{what} has token ids outside the vocabulary [0, {self.config.vocab_size}): {bad[:5]}")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"{what} of {len(ids)} tokens does not fit the context: max_model_len is "
                             f"{self.max_model_len} and at least one token must be generated")
        worst = min(len(ids) + params.max_tokens, self.max_model_len)
        need = self.block_manager.blocks_for(worst)
        if need > self.block_manager.num_blocks:
            raise ValueError(f"KV pool too small: {what} of {len(ids)} tokens + max_tokens {params.max_tokens} "
                             f"needs {need} blocks of {self.block_manager.block_size} tokens, the pool has "
                             f"{self.block_manager.num_blocks}")
        if params.guided is not None:
            self.guided.compile(params.guided)  # a schema that does not compile is rejected here, not mid-batch

    def _new_id(self, request_id: str | None) -> str:
        if request_id is None:
            request_id = str(self._next_request)
            self._next_request += 1
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        return request_id

    def _make_seq(self, ids: list[int], params: SamplingParams, request_id: str) -> Sequence:
        gen = None
        if not params.greedy:
            gen = self.generator if params.seed is None else \
                torch.Generator(device=self.device).manual_seed(params.seed)
        seq = Sequence(list(ids), params, request_id=request_id, generator=gen, max_len=self.max_model_len)
        self._detok[seq.seq_id] = _Detok()
        if params.guided is not None:
            self._matchers[seq.seq_id] = self.guided.matcher(params.guided)
        return seq

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    request_id: str | None = None, keep_kv: bool = False) -> Sequence:
        """Queue a request. With `keep_kv` its blocks outlive it, for `add_fork(prefix=seq)`, until
        `release(seq)`."""
        params = params or SamplingParams()
        ids = self.check(prompt, params)
        seq = self._make_seq(ids, params, self._new_id(request_id))
        seq.keep_kv = keep_kv
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq

    def add_embed(self, prompt: Prompt, pool_from: int = 0, request_id: str | None = None) -> Sequence:
        """Queue an embedding request: its prompt is prefilled in full (no prefix-cache hit: every token's hidden
        state is needed) and `seq.embedding` is the mean of its final (normed) hidden states from token `pool_from`
        on; it samples nothing and frees its blocks in the step that computed it."""
        ids = self.encode(prompt)
        self._validate(ids, SamplingParams(max_tokens=1))
        if isinstance(pool_from, bool) or not isinstance(pool_from, int) or not 0 <= pool_from < len(ids):
            raise ValueError(f"pool_from must be an int in [0, {len(ids)}) for a prompt of {len(ids)} tokens, "
                             f"got {pool_from!r}")
        seq = Sequence(ids, SamplingParams(max_tokens=1), request_id=self._new_id(request_id), prefill_only=True,
                       pool=True, pool_from=pool_from, max_len=self.max_model_len)
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq

    def add_fork(self, prefix: Prompt | Sequence, suffixes: list[Prompt],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 prefix_len: int | None = None) -> list[Sequence]:
        """Prefill `prefix` once; child i continues from it with `suffixes[i]` (token ids, or text
        tokenized on its own). Children share the prefix's full blocks; they are ordinary requests.

        `prefix` may also be a finished request added with `keep_kv=True`: its KV is already in the pool,
        so the children continue from its first `prefix_len` tokens (default: all) with nothing prefilled
        again but the tail of the last, partial block."""
        held = prefix if isinstance(prefix, Sequence) else None
        if held is not None:
            if not held.is_finished:
                raise ValueError("fork from a request that has not finished: its KV is still being written")
            n = len(held) if prefix_len is None else prefix_len
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(held):
                raise ValueError(f"prefix_len must be an int in [1, {len(held)}], got {prefix_len!r}")
            prefix_ids = held.token_ids[:n]
        else:
            if prefix_len is not None:
                raise ValueError("prefix_len is only for a fork from a finished request")
            prefix_ids = self.encode(prefix)
        if not prefix_ids:
            raise ValueError("empty prefix")
        if not isinstance(suffixes, list) or not suffixes:
            raise ValueError("a fork needs a non-empty list of suffixes")
        plist = expand_params(params, len(suffixes), what="suffixes")
        child_ids = []
        for i, (suf, p) in enumerate(zip(suffixes, plist)):
            if not isinstance(suf, (str, list)) or (suf and isinstance(suf[0], dict)):
                raise ValueError(f"fork suffix {i} must be text or token ids, got {type(suf).__name__}")
            ids = prefix_ids + (self.encode(suf, add_bos=False) if suf else [])
            self._validate(ids, p, what=f"fork child {i}")
            child_ids.append(ids)
        if held is not None:
            children = [self._make_seq(ids, p, self._new_id(None)) for ids, p in zip(child_ids, plist)]
            for c in children:
                self.requests[c.request_id] = c
                self._fork_child(held, c, min(len(prefix_ids), held.num_cached_tokens, len(c) - 1))
            return children
        parent = Sequence(prefix_ids, SamplingParams(max_tokens=1), prefill_only=True, max_len=self.max_model_len)
        parent.request_id = f"fork-parent-{parent.seq_id}"
        children = [self._make_seq(ids, p, self._new_id(None)) for ids, p in zip(child_ids, plist)]
        for c in children:
            self.requests[c.request_id] = c
        self._forks[parent.seq_id] = (parent, list(children))
        self.scheduler.add(parent)
        return children

    def abort(self, request_id: str) -> None:
        seq = self.requests.get(request_id)
        if seq is None or seq.is_finished:
            return
        for parent_id, (parent, kids) in list(self._forks.items()):
            if seq in kids:  # not spawned yet: holds no blocks
                kids.remove(seq)
                if not kids:  # nobody left to fork for
                    del self._forks[parent_id]
                    self.scheduler.remove(parent)
                self._finish(seq, "abort")
                return
        self.scheduler.remove(seq)
        self._finish(seq, "abort")

    # ---- the loop ------------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[StepOutput]:
        for hook in self.step_hooks:
            hook.before_step()
        outputs = self._step()
        for hook in self.step_hooks:
            hook.after_step(outputs)
        return outputs

    def _step(self) -> list[StepOutput]:
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            if self.scheduler.waiting:
                raise PoolExhausted("no sequence can be scheduled: the KV pool cannot hold the next "
                                    "waiting request even with nothing running")
            return []
        now = time.perf_counter()
        for s in seqs:
            if s.timings.first_scheduled is None:
                s.timings.first_scheduled = now
        self.counters["steps"] += 1
        self.counters["prefix_cache_hit_tokens"] = self.block_manager.hit_tokens  # hits happen in admission
        decoding = sum(s.num_scheduled == 1 and s.num_output_tokens > 0 and s.num_pending == 1 for s in seqs)
        self.counters["prefill_tokens"] += sum(s.num_scheduled for s in seqs) - decoding
        self.counters["decode_tokens"] += decoding
        self.max_decode_batch = max(self.max_decode_batch, decoding)
        logits = self.runner.run(seqs, is_prefill)
        for s in seqs:  # blocks filled by this step can serve later requests (before a finished one frees them)
            self.block_manager.commit(s)
        # a prompt part-way through a chunked prefill has nothing to sample yet
        done = [s.num_pending == 0 for s in seqs]
        active = [i for i, s in enumerate(seqs) if not s.prefill_only and done[i]]
        guided = [(j, m) for j, i in enumerate(active) if (m := self._matchers.get(seqs[i].seq_id)) is not None]
        # a copy of the [B, vocab] logits only to drop rows or to change them in place (an inference tensor)
        processed = any(seqs[i].params.logits_processors for i in active)
        rows = logits[active] if guided or processed or len(active) != len(seqs) else logits
        tokens, failed = self._choose(rows, [seqs[i] for i in active], guided, processed) if active else ([], {})
        outputs: list[StepOutput] = []
        for s, d in zip(seqs, done):
            if s.pool:
                self.scheduler.remove(s)
                self._finish(s, "stop")
                outputs.append(StepOutput(s, [], "", True))
            elif s.prefill_only and d:
                self._spawn_children(s)
        for i, tok in zip(active, tokens):
            outputs.append(self._append_token(seqs[i], tok, failed.get(seqs[i].seq_id)))
        return outputs

    def _choose(self, rows: torch.Tensor, seqs: list[Sequence], guided: list[tuple[int, Matcher]],
                processed: bool) -> tuple[list[int], dict[int, str]]:
        """Each row's next token, and {seq_id: error} for rows whose logits processor failed. Logits processors see
        the model's logits; a grammar then rules out what it does not allow. Its mask is computed up front only
        where a row's token could not be checked afterwards (under top-k/top-p the masked distribution's head is
        not the unmasked one's). Other guided rows are sampled unmasked, and only where the grammar rejects the
        token masked and sampled again (llama.cpp's order): greedy, the same token as masking first; with
        temperature alone, a sample of the masked distribution all the same (a rejected draw is redrawn from
        it). The mask is llguidance's dearest part (~0.3 ms a row for free text): most steps now skip it."""
        params, gens = [s.params for s in seqs], [s.generator for s in seqs]
        # what a grammar allows may be exactly what a processor banned: such a row falls back to its model logits
        raw = {j: rows[j].clone() for j, _ in guided if params[j].logits_processors}
        failed = self._process_logits(rows, seqs) if processed else {}
        upfront = [(j, m) for j, m in guided if not _check_after(params[j])]
        if upfront:
            self._mask(rows, upfront, raw)
        tokens = sample(rows, params, gens)
        redo = [(j, m) for j, m in guided if _check_after(params[j]) and not self.guided.allows(m, tokens[j])]
        if redo:
            again = rows[[j for j, _ in redo]]
            self._mask(again, [(k, m) for k, (_, m) in enumerate(redo)],
                       {k: raw[j] for k, (j, _) in enumerate(redo) if j in raw})
            for (j, _), tok in zip(redo, sample(again, [params[j] for j, _ in redo], [gens[j] for j, _ in redo])):
                tokens[j] = tok
        return tokens, failed

    def _mask(self, rows: torch.Tensor, which: list[tuple[int, Matcher]], raw: dict[int, torch.Tensor]) -> None:
        self.guided.apply(rows, [j for j, _ in which], [m for _, m in which])
        for j, m in which:
            if j in raw and torch.isneginf(rows[j].max()):  # processors and grammar left nothing: the grammar wins
                rows[j] = raw[j]
                self.guided.apply(rows, [j], [m])

    @staticmethod
    def _process_logits(rows: torch.Tensor, seqs: list[Sequence]) -> dict[int, str]:
        """Apply each row's logits processors in place; {seq_id: error} for rows whose processor raised (they are
        sampled unprocessed, then end)."""
        failed: dict[int, str] = {}
        for j, seq in enumerate(seqs):
            for fn in seq.params.logits_processors:
                try:
                    out = fn(seq.output_ids, rows[j])
                    if not isinstance(out, torch.Tensor) or out.shape != rows[j].shape:
                        raise ValueError(f"returned {type(out).__name__}, not a logits row of {tuple(rows[j].shape)}")
                    if out.data_ptr() != rows[j].data_ptr():
                        rows[j] = out
                except Exception as e:  # noqa: BLE001 -- user code; the other requests must go on
                    failed[seq.seq_id] = f"logits processor error: {type(e).__name__}: {e}"
                    break
        return failed

    def _spawn_children(self, parent: Sequence) -> None:
        """The fork parent's KV is in the pool: children take references to it, then it goes."""
        for child in self._forks.pop(parent.seq_id, (parent, []))[1]:
            self._fork_child(parent, child, len(parent) if len(child) > len(parent) else len(parent) - 1)
        self.scheduler.remove(parent)
        parent.status = Status.FINISHED

    def _fork_child(self, parent: Sequence, child: Sequence, shared: int) -> None:
        """Queue `child` holding references to the parent's KV for its first `shared` tokens."""
        if shared > 0 and parent.block_table:
            try:
                self.runner.copy_blocks(self.block_manager.fork(parent, child, shared))
                child.prefix_cached_tokens = shared
            except PoolExhausted:
                pass  # no block for the copy: the child recomputes its prefix instead
        self.scheduler.add(child)

    def _append_token(self, seq: Sequence, tok: int, error: str | None = None) -> StepOutput:
        now = time.perf_counter()
        seq.token_ids.append(tok)
        if seq.timings.first_token is None:
            seq.timings.first_token = now
        p = seq.params
        reason: str | None = None
        matcher = self._matchers.get(seq.seq_id)
        rejected = matcher is not None and not matcher.accept(tok)  # masked, so only on a grammar failure
        if error is not None:  # its logits processor failed: this request ends, the batch goes on
            reason, seq.stop_reason = "stop", error
        elif tok in p.stop_token_ids:
            reason, seq.stop_reason = "stop", tok
        elif not p.ignore_eos and tok in self.eos_ids:
            reason = "stop"
        elif rejected:  # like a failing stop_fn: this request ends, the batch goes on
            reason, seq.stop_reason = "stop", f"grammar error: {matcher.error}"
        elif matcher is not None and matcher.done:  # the JSON is complete
            reason = "stop"
        elif seq.num_output_tokens >= p.max_tokens or len(seq) >= seq.max_len:
            reason = "length"
        new_text = ""
        if self.tokenizer is not None:
            new_text, hit = self._detokenize(seq, final=reason is not None)
            if hit is not None:
                reason, seq.stop_reason = "stop", hit
        if reason is not None:
            self.scheduler.remove(seq, free=not seq.keep_kv)  # blocks back in the pool in this very step
            self._finish(seq, reason)
        return StepOutput(seq, [tok], new_text, reason is not None)

    def _detokenize(self, seq: Sequence, final: bool = False) -> tuple[str, str | None]:
        """Extend the output text by the new tokens (complete characters only, until the end); returns the text
        not yet emitted and the stop string that was hit, if any (the text is cut before it)."""
        st = self._detok[seq.seq_id]
        text = self.tokenizer.decode_more(seq.output_ids, st.decoded, final)
        hit, cut = None, len(text)
        for stop in seq.params.stop:
            idx = text.find(stop, max(0, st.stop_scan_from - len(stop) + 1))
            if idx != -1 and idx < cut:
                hit, cut = stop, idx
        if seq.params.stop_fn is not None and hit is None:
            found = self._run_stop_fn(seq, text[:cut])
            if found is not None:
                hit, cut = found
        text = text[:cut]
        st.stop_scan_from = len(text)
        new = text[st.emitted:]
        st.emitted = max(st.emitted, len(text))
        seq.text = text
        return new, hit

    @staticmethod
    def _run_stop_fn(seq: Sequence, text: str) -> tuple[str, int] | None:
        """(stop_reason, cut) if the request's stop rule fires. A rule that raises or returns nonsense
        stops only its own request (stop_reason "stop_fn error: ..."), never the batch's step."""
        try:
            found = seq.params.stop_fn(text)
            if found is None:
                return None
            at, why = found
            if isinstance(at, bool) or not isinstance(at, int) or not 0 <= at <= len(text):
                raise ValueError(f"cut {at!r} outside the text [0, {len(text)}]")
            return str(why), at
        except Exception as e:  # noqa: BLE001 -- user code; the other requests must go on
            return f"stop_fn error: {type(e).__name__}: {e}", len(text)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.timings.finished = time.perf_counter()
        self._detok.pop(seq.seq_id, None)
        self._matchers.pop(seq.seq_id, None)

    def release(self, seq: Sequence) -> None:
        """Forget a finished request (its id becomes reusable) and free the blocks it kept, if any."""
        if self.requests.get(seq.request_id) is seq and seq.is_finished:
            del self.requests[seq.request_id]
            if seq.block_table:
                self.block_manager.free(seq)

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (also done at exit); the engine cannot step after."""
        if self.workers is not None:
            self.workers.close()

    def reset_prefix_cache(self) -> bool:
        """vLLM's `reset_prefix_cache`: drop every cached prefix block; False (nothing dropped) while any request
        holds blocks."""
        return self.block_manager.reset_cache()

    def stats(self) -> dict[str, int]:
        bm = self.block_manager
        return {"free_blocks": bm.num_free, "total_blocks": bm.num_blocks, "block_size": bm.block_size,
                "cached_blocks": len(bm.cached),
                "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kept": sum(1 for s in self.requests.values() if s.is_finished and s.block_table),
                "max_decode_batch": self.max_decode_batch, **self.counters}
