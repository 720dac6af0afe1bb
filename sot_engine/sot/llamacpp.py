"""llama.cpp (through llama-cpp-python, the optional `llamacpp` extra) on the same GGUF file: the reference point for
CPU decode speed (`benchmarks.decode_cpu --llama-cpp`), for what the file's quantization costs in accuracy
(`benchmarks.quant_accuracy`), and the normal decoding SoT races (`sot compare/bench --against llama.cpp`).

`LlamaCpp(path, threads)` holds one llama.cpp context with up to `n_seq` parallel sequences (its own batching:
one `llama_decode` of B tokens, one per sequence, is a batch-B decode step). Prompts are token ids, so both
engines see exactly the same input (the same vocabulary: the file's). Greedy sampling is an argmax of the
float32 logits it returns.
"""
from __future__ import annotations

import ctypes
import time
from pathlib import Path

import numpy as np


INSTALL = "pip install 'sot-engine[llamacpp]' (llama-cpp-python; it builds llama.cpp: minutes, cmake and a compiler)"


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def require() -> None:
    """ImportError naming the install command where llama-cpp-python is missing."""
    if not available():
        raise ImportError(f"llama.cpp is not installed: {INSTALL}")


class LlamaCpp:
    def __init__(self, path: str | Path, threads: int, n_ctx: int = 4096, n_seq: int = 16) -> None:
        require()
        import llama_cpp as L
        self.L = L
        L.llama_backend_init()
        self._quiet = L.llama_log_callback(lambda *a: None)  # kept: llama.cpp calls it later
        L.llama_log_set(self._quiet, ctypes.c_void_p(0))
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise ValueError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, 512, 512, n_seq
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = True  # one pool for all sequences (else each gets n_ctx / n_seq cells: 256)
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.n_seq = n_seq
        self.batch = L.llama_batch_init(512, 0, n_seq)
        self.system_info = L.llama_print_system_info().decode()
        self.version = getattr(L, "__version__", "?")

    def close(self) -> None:
        L = self.L
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) items."""
        b = self.batch
        for i, (tok, pos, seq, out) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def logits(self, i: int) -> np.ndarray:
        """The float32 logits of output row i of the last decode (a copy)."""
        ptr = self.L.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def prefill(self, prompts: list[list[int]]) -> list[np.ndarray]:
        """Clear the cache, prefill prompt s as sequence s; each prompt's last-token logits."""
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        out = []
        for s, ids in enumerate(prompts):
            for a in range(0, len(ids), 512):
                chunk = ids[a:a + 512]
                self._decode([(t, a + j, s, a + j == len(ids) - 1) for j, t in enumerate(chunk)])
            out.append(self.logits(-1))
        return out

    def generate(self, prompt: list[int], max_tokens: int, stop_ids: set[int]) -> tuple[list[int], float]:
        """Normal greedy decoding of one prompt (batch 1), as the engine's normal mode decodes: up to max_tokens,
        ending at (and keeping) a stop token. The tokens, and the seconds from the prefill's start to the last."""
        t0 = time.perf_counter()
        tok = int(np.argmax(self.prefill([prompt])[0]))
        out, pos = [tok], len(prompt)
        while len(out) < max_tokens and tok not in stop_ids:
            self._decode([(tok, pos, 0, True)])
            tok = int(np.argmax(self.logits(0)))
            out.append(tok)
            pos += 1
        return out, time.perf_counter() - t0

    def greedy(self, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], list[float]]:
        """Greedy tokens of every prompt, decoded together (a batch of len(prompts) per step), and each step's
        seconds (llama_decode plus the argmaxes)."""
        firsts = [int(np.argmax(lg)) for lg in self.prefill(prompts)]
        toks, pos = [[t] for t in firsts], [len(p) for p in prompts]
        times = []
        for _ in range(steps - 1):
            t0 = time.perf_counter()
            self._decode([(t[-1], pos[s], s, True) for s, t in enumerate(toks)])
            nxt = [int(np.argmax(self.logits(s))) for s in range(len(prompts))]
            times.append(time.perf_counter() - t0)
            for s, t in enumerate(nxt):
                toks[s].append(t)
                pos[s] += 1
        return toks, times
