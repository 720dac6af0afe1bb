"""benchmarks.common helpers that every benchmark leans on."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from benchmarks import common


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
    assert common.result_path("x", cpu, ".png") == common.RESULTS / "cpu" / "x.png"
