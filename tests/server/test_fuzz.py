"""1000 malformed and hostile requests (benchmarks.fuzz_server's seeded generator; the benchmark runs more): each
answer is a success or an OpenAI-shaped error, never a 5xx or a traceback, and the server ends alive and idle
with the KV pool whole."""
from __future__ import annotations

import httpx

from benchmarks.fuzz_server import LIMITS, fuzz


def test_a_thousand_hostile_requests(tiny_chat_dir):
    from sot_engine.engine import LLM
    from sot_engine.sot.server.background import BackgroundServer
    from sot_engine.sot.server.limits import ServerLimits
    srv = BackgroundServer(LLM(str(tiny_chat_dir), max_model_len=256, num_blocks=128, block_size=4),
                           limits=ServerLimits(**LIMITS))
    try:
        tally = fuzz(srv.url, srv.model, 1000, seed=11)
        assert tally.failures == []
        assert sum(tally.statuses.values()) == 1000
        assert tally.statuses[200] > 100 and tally.statuses[400] > 300 and tally.statuses[413] > 10
        assert tally.kinds["dropped"] > 10  # streams hung up on mid-way
        assert len(tally.kinds) >= 18  # every kind of breakage was drawn
        assert httpx.get(srv.url + "/health").status_code == 200
        st = srv.wait_idle()
        assert (st["running"], st["waiting"]) == (0, 0) and st["free_blocks"] == st["total_blocks"], st
    finally:
        srv.close()
