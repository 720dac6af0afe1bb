"""Build hook. The pure-Python packages are described in pyproject.toml; this adds the optional C++
CPU kernels (csrc/cpu/*.cpp -> `kernels._cpp`, the "cpp" kernel backend) as a torch extension.

The extension needs torch importable at build time, so install with `--no-build-isolation` after
torch (scripts/install.sh does). It is optional: no torch at build time, no compiler, or a failed
compile only prints a warning, the install goes on, and the engine runs on the torch backend.
`SOT_NO_CSRC=1` skips it on purpose.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def _warn(msg: str) -> None:
    print(f"WARNING (sot-engine): {msg}; the 'cpp' kernel backend will be unavailable", file=sys.stderr)


def csrc_extensions() -> dict:
    if os.environ.get("SOT_NO_CSRC"):
        return {}
    sources = sorted(p.relative_to(HERE).as_posix() for p in (HERE / "csrc" / "cpu").glob("*.cpp"))
    if not sources:
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # e.g. an isolated build environment without torch
        _warn(f"torch is not importable at build time ({e}); skipping kernels._cpp "
              "(pip install -e . --no-build-isolation after torch builds it)")
        return {}

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension whose failures (compiler missing, compile error, ninja error) only warn."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any failure of an optional build must not fail the install
                _warn(f"building the C++ kernels failed ({type(e).__name__}: {e})")

        def copy_extensions_to_source(self) -> None:  # editable installs: skip what did not build
            try:
                super().copy_extensions_to_source()
            except Exception as e:  # noqa: BLE001
                _warn(f"installing the C++ kernels failed ({type(e).__name__}: {e})")

        def get_outputs(self) -> list[str]:
            return [p for p in super().get_outputs() if os.path.exists(p)]

    cflags = ["-O3", "-std=c++17"]
    if os.environ.get("SOT_CSRC_NATIVE", "1") == "1":
        cflags.append("-march=native")  # built where it runs (editable install); AVX2/FMA paths
    ldflags: list[str] = []
    # at::parallel_for is inline OpenMP code in torch's headers: without -fopenmp it runs serially
    if torch._C.has_openmp:
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    ext = CppExtension("kernels._cpp", sources, extra_compile_args=cflags, extra_link_args=ldflags,
                       optional=True)
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


setup(**csrc_extensions())
