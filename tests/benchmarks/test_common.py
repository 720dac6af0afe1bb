"""benchmarks.common helpers that every benchmark leans on."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from benchmarks import common
from sot_engine.environment import cpu_isa


def test_sigterm_becomes_keyboard_interrupt_inside_the_block():
    with pytest.raises(KeyboardInterrupt):
        with common.sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    with common.sigterm_as_interrupt(active=False):
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_copy_bandwidth_and_environment():
    cpu = torch.device("cpu")
    bw = common.copy_bandwidth(cpu, 1 << 20)
    assert bw["bytes"] == 1 << 20 and bw["gbps"] > 0 and bw["ms"] > 0
    env = common.environment(cpu)
    assert env["device_type"] == "cpu" and env["torch"] == torch.__version__ and "triton" in env
    assert env.get("cpu_isa") in (None, "AVX2", "AVX-512", "AVX-512 VNNI", "AVX-512 VNNI, AMX")
    assert common.result_path("x", cpu, ".png") == common.RESULTS / "cpu" / "x.png"


@pytest.mark.parametrize("flags, isa", [("fpu sse2 avx avx2 fma", "AVX2"), ("avx2 avx512f avx512bw", "AVX-512"),
                                        ("avx2 avx512f avx512_vnni", "AVX-512 VNNI"),
                                        ("avx2 avx512f avx512_vnni amx_tile amx_int8", "AVX-512 VNNI, AMX"),
                                        ("fpu sse2", None)])
def test_cpu_isa_reads_the_flags(tmp_path, flags, isa):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert cpu_isa(str(info)) == isa
    assert cpu_isa(str(tmp_path / "missing")) is None
