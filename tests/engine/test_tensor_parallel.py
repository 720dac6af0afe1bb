"""Tensor parallelism on a CPU (gloo): TP=N gives TP=1's logits and tokens, a worker's death is a clear error,
and no worker process outlives its engine."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sot_engine.engine import LLM, SamplingParams
from sot_engine.engine.parallel import Shard, TensorParallelError, shard_config, shard_spec
from tests.conftest import requires_smollm2
from tests.engine.test_chunked_prefill import assert_same, prompts, run

ROOT = Path(__file__).resolve().parents[2]


def tiny(tiny_dir, tp: int, **kw) -> LLM:
    args = dict(dtype=torch.float64, block_size=8, num_blocks=64, max_num_seqs=6, max_num_batched_tokens=16)
    return LLM(str(tiny_dir), tensor_parallel_size=tp, **(args | kw))


def test_shards_cover_every_matrix_once(tiny_dir):
    from sot_engine.engine.loader import load_model
    whole = load_model(str(tiny_dir))
    parts = [load_model(str(tiny_dir), shard=Shard(r, 2)) for r in range(2)]
    assert "lm_head.weight" in parts[0].weights and "lm_head.weight" not in parts[1].weights
    for name, w in whole.weights.items():
        spec = shard_spec(name, whole.config, Shard(0, 2))
        if name == "lm_head.weight":  # the driver's alone
            assert torch.equal(parts[0].weights[name], w)
        elif spec is None:
            assert all(torch.equal(p.weights[name], w) for p in parts), name
        else:
            assert torch.equal(torch.cat([p.weights[name] for p in parts], dim=spec[0]), w), name
    cfg = shard_config(whole.config, 2)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size) == (2, 1, 128)
    with pytest.raises(ValueError, match="does not divide KV heads"):
        shard_config(whole.config, 4)


def test_tp2_equals_tp1_ragged_chunked_cached_preempted(tiny_dir):
    """Requests arriving mid-run, prompts in chunks beside decodes, a shared prefix from the cache, and a pool
    small enough to preempt: the same tokens and logits within 1e-10 (float64)."""
    p = prompts(5, [5, 40, 3, 50, 21])
    shared = p[1][:24]
    arrivals = {0: [(p[0], 20), (p[1], 12), (p[2], 20)], 2: [(shared + p[4], 8)], 3: [(p[3], 10)]}
    one = run(tiny(tiny_dir, 1, num_blocks=22, block_size=4), arrivals)
    two_llm = tiny(tiny_dir, 2, num_blocks=22, block_size=4)
    try:
        two = run(two_llm, arrivals)
    finally:
        two_llm.engine.close()
    assert_same(two, one)
    assert sum(r[2] for r in two) > 0 and two[3][3] == 24  # it preempted, and the prefix came from the cache


@pytest.mark.parametrize("lm_head", ["whole", "vocab"])
def test_tp2_fork_and_embed_equal_tp1(tiny_dir, lm_head):
    g = torch.Generator().manual_seed(11)
    prefix = torch.randint(0, 512, (37,), generator=g).tolist()
    suffixes = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (6, 1, 19, 0)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (9, 4, 15, 7)]
    one = tiny(tiny_dir, 1)
    two = tiny(tiny_dir, 2, tensor_parallel_lm_head=lm_head)
    try:
        assert [o.token_ids for o in two.fork(prefix, suffixes, params)] == \
            [o.token_ids for o in one.fork(prefix, suffixes, params)]
        p = prompts(3, [9])[0]
        assert_same(run(two, {0: [(p, 20)]}), run(one, {0: [(p, 20)]}))  # logits within 1e-10
        assert torch.allclose(two.embed([prefix]), one.embed([prefix]), rtol=0, atol=1e-10)
        assert two.stats()["free_blocks"] == two.stats()["total_blocks"]
    finally:
        two.engine.close()


def test_a_dead_worker_is_a_clear_error_and_leaves_no_process(tiny_dir):
    llm = tiny(tiny_dir, 2, tensor_parallel_timeout=20)
    procs = list(llm.engine.workers.procs)
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    assert llm.generate([[5, 6, 7]], sp)[0].token_ids
    with pytest.raises(ValueError, match="outside the vocabulary"):  # a bad request fails before any rank computes
        llm.generate([[5, 10 ** 6]], sp)
    llm.engine.workers.kill_one()
    procs[0].join(10)
    t = time.monotonic()
    with pytest.raises(TensorParallelError, match="worker 1 exited with code 3"):
        llm.generate([[5, 6, 7]], sp)
    assert time.monotonic() - t < 20
    llm.engine.close()
    assert not any(p.is_alive() for p in procs)


def test_close_stops_every_worker(tiny_dir):
    llm = tiny(tiny_dir, 2)
    procs = list(llm.engine.workers.procs)
    assert all(p.is_alive() for p in procs)
    llm.engine.close()
    assert not any(p.is_alive() for p in procs) and all(p.exitcode == 0 for p in procs)


def test_an_exiting_program_leaves_no_worker(tiny_dir, tmp_path):
    """A program that never closes its engine, or is interrupted: its workers go with it."""
    script = tmp_path / "leave.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, signal
        sys.path.insert(0, {str(ROOT)!r})
        from sot_engine.engine import LLM
        llm = LLM({str(tiny_dir)!r}, tensor_parallel_size=2, num_blocks=16, block_size=8)
        print(llm.engine.workers.procs[0].pid, flush=True)
        if sys.argv[1] == "interrupt":
            os.kill(os.getpid(), signal.SIGINT)
    """))
    for how in ("exit", "interrupt"):
        r = subprocess.run([sys.executable, str(script), how], capture_output=True, text=True, timeout=120)
        pid = int(r.stdout.split()[0])
        deadline = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), f"worker {pid} outlived the program ({how})"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_torchrun_two_processes_over_tcp(tiny_dir, tmp_path):
    """torchrun starts both ranks (rendezvous over TCP); rank 1 turns into a worker inside LLM(...)."""
    script = tmp_path / "tp.py"
    out = tmp_path / "tokens.txt"
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from sot_engine.engine import LLM, SamplingParams
        llm = LLM({str(tiny_dir)!r}, dtype=torch.float64, tensor_parallel_size=2, num_blocks=32, block_size=8)
        out = llm.generate([[5, 6, 7, 8], [9] * 20], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        open({str(out)!r}, "w").write(repr([o.token_ids for o in out]))
        llm.engine.close()
    """))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", str(script)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    want = LLM(str(tiny_dir), dtype=torch.float64, num_blocks=32, block_size=8).generate(
        [[5, 6, 7, 8], [9] * 20], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert out.read_text() == repr([o.token_ids for o in want])


@requires_smollm2
@pytest.mark.parametrize("lm_head", ["whole", "vocab"])
def test_smollm2_tp3_greedy_equals_tp1(smollm2, lm_head):
    """SmolLM2 (9 heads, 3 KV heads) split three ways, fp32: the same greedy tokens for 32 tokens on 3 prompts
    (its lm_head is tied to the embedding: "vocab" takes each rank's rows of the table)."""
    qs = [q["text"] for q in smollm2.questions[:3]]
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    msgs = [[{"role": "user", "content": q}] for q in qs]
    want = smollm2.llm.generate(msgs, sp)
    llm = LLM("default", tensor_parallel_size=3, kv_cache_memory=64 << 20, tensor_parallel_lm_head=lm_head)
    try:
        got = llm.generate(msgs, sp)
    finally:
        llm.engine.close()
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_sot_answer_through_tp_equals_tp1(tiny_chat_dir):
    from sot_engine.sot.driver import SoT, SoTConfig
    cfg = SoTConfig(skeleton_max_tokens=40, point_max_tokens=12, normal_max_tokens=24)
    one = SoT(LLM(str(tiny_chat_dir), dtype=torch.float64, num_blocks=128, block_size=8), cfg, router="rules")
    two_llm = LLM(str(tiny_chat_dir), dtype=torch.float64, num_blocks=128, block_size=8, tensor_parallel_size=2)
    try:
        two = SoT(two_llm, cfg, router="rules")
        for mode in ("sot", "normal"):
            a, b = one.answer("List tips for sleeping well.", mode=mode), two.answer("List tips for sleeping well.",
                                                                                   mode=mode)
            assert (b.mode, b.text) == (a.mode, a.text)
    finally:
        two_llm.engine.close()


def test_server_with_tp2(tiny_chat_dir):
    pytest.importorskip("fastapi")
    from sot_engine.sot.server.background import BackgroundServer
    llm = LLM(str(tiny_chat_dir), max_model_len=256, num_blocks=64, block_size=4, tensor_parallel_size=2)
    ref = LLM(str(tiny_chat_dir), max_model_len=256, num_blocks=64, block_size=4)
    srv = BackgroundServer(llm)
    try:
        c = srv.client()
        msgs = [{"role": "user", "content": "Name three colors."}]
        r = c.chat.completions.create(model=srv.model, messages=msgs, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
        want = ref.generate([msgs], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
        assert r.choices[0].message.content == want.text
        st = srv.wait_idle()
        assert st["free_blocks"] == st["total_blocks"]
    finally:
        srv.close()
        llm.engine.close()
