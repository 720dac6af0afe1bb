"""The CPU variants of the C++ kernels (csrc/cpu/target.h, module.cpp): one build serves every x86-64 machine.
The kernels themselves are checked on each variant in test_cpp_cpu.py."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.kernels.test_cpp_cpu import MODULE as _cpp  # the module itself, not a variant's submodule
from tests.kernels.test_cpp_cpu import needs_cpp

pytestmark = needs_cpp


def test_amx_is_used_where_the_cpu_has_it():
    """Where the CPU and OS offer AMX (this project's CI VM does) the build must use it: a build that silently
    lost it would pass every equality test on the fallback."""
    if not all(f in cpu_flags() for f in ("amx_tile", "amx_bf16", "avx512_bf16")):
        pytest.skip("this CPU has no AMX-BF16: the fallback serves bf16 precision")
    if os.environ.get("SOT_CPU_VARIANT") or os.environ.get("SOT_NO_AMX") or "amx" not in _cpp.COMPILED_VARIANTS:
        pytest.skip("a lower variant asked for (SOT_CPU_VARIANT), AMX turned off (SOT_NO_AMX), or a build without "
                    "the amx variant (SOT_CSRC_VARIANTS, SOT_CSRC_NATIVE=1)")
    assert _cpp.VARIANT == "amx" and _cpp.AMX_COMPILED and _cpp.AMX_READY and "amx-bf16" in _cpp.build_info()


def cpu_flags() -> list[str]:
    return open("/proc/cpuinfo").read().split() if sys.platform == "linux" else []


def test_the_widest_variant_the_cpu_runs_is_chosen():
    """One build serves every x86-64 machine: the module binds each compiled variant the CPU runs and uses the
    widest, so an AVX2-only CI machine and an AVX-512 one import the same library."""
    if set(_cpp.COMPILED_VARIANTS) == {"native"}:
        pytest.skip("one variant built for this machine (SOT_CSRC_NATIVE=1, or not GCC on x86-64)")
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo")
    want = ["generic"]
    if "avx2" in flags and "fma" in flags:
        want.append("avx2")
        if all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd")):
            want.append("avx512")
            if all(f in flags for f in ("amx_tile", "amx_bf16", "avx512_bf16")):
                want.append("amx")
    want = [v for v in want if v in _cpp.COMPILED_VARIANTS]
    assert list(_cpp.VARIANTS) == want
    if not os.environ.get("SOT_CPU_VARIANT"):
        assert _cpp.VARIANT == want[-1]
    for v in want:
        sub = _cpp.variant(v)
        assert sub.build_info().startswith(f"sot_csrc: {v} (")
        # the int8 kernels go no higher than their variant: the avx2 variant is what an AVX2-only machine runs
        assert sub.int8_isa() in {"generic": ["scalar"], "avx2": ["scalar", "avx2"]}.get(v, [sub.int8_isa()])
    with pytest.raises(ValueError, match="no kernel variant 'amx512'"):
        _cpp.variant("amx512")


def test_a_lower_variant_can_be_asked_for():
    """SOT_CPU_VARIANT picks a lower variant at import (A/B runs); one the CPU does not run is a warning, not a
    crash."""
    code = "import sot_engine.kernels._cpp as c; print(c.VARIANT)"
    for want, expect in ((_cpp.VARIANTS[0], _cpp.VARIANTS[0]), ("sse9", _cpp.VARIANTS[-1])):
        r = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True,
                           env={**os.environ, "SOT_CPU_VARIANT": want}, timeout=120)
        assert r.returncode == 0 and r.stdout.split() == [expect], r.stderr
        assert ("not a kernel variant this CPU runs" in r.stderr) == (want == "sse9")


def test_headers_are_compiled_alike_in_every_variant():
    """The one-definition guard: every variant's wrapper includes the headers before `#pragma GCC target`, so an
    inline function or template of torch, pybind11 or the standard library is compiled for the baseline in every
    variant; if one were compiled for AVX-512 in one variant, the linker could hand that copy to all, and an
    AVX2-only machine would fault on it. So no code outside the wide variants' namespaces may touch a 256- or
    512-bit register, and none outside avx512/amx an AVX-512 one."""
    if set(_cpp.COMPILED_VARIANTS) == {"native"}:
        pytest.skip("one variant built for this machine")
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("no objdump")
    asm = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", _cpp.__file__], capture_output=True,
                         text=True, check=True, timeout=300).stdout
    wide = re.compile(r"%ymm|%zmm")
    avx512 = re.compile(r"%zmm|%ymm(1[6-9]|2[0-9]|3[01])|%xmm(1[6-9]|2[0-9]|3[01])|%k[1-7]")
    bad: set[str] = set()
    name = ""
    for line in asm.splitlines():
        if line.endswith(">:"):
            name = line[line.index("<") + 1:-2]
            continue
        if wide.search(line) and not re.search(r"sot_cpu::(avx2|avx512|amx)::", name):
            bad.add(name)
        elif avx512.search(line) and not re.search(r"sot_cpu::(avx512|amx)::", name):
            bad.add(name)
    assert name and not bad, sorted(bad)[:20]
