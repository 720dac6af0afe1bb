"""Build hook. The pure-Python packages are described in pyproject.toml; this adds the optional C++
CPU kernels (csrc/cpu/*.cpp -> `sot_engine.kernels._cpp`, the "cpp" kernel backend; each kernel file compiled once per
CPU variant, see cpu_variants and csrc/README.md) as a torch extension, and,
when torch has CUDA and nvcc is found, the CUDA kernels (csrc/cuda -> `sot_engine.kernels._cuda`, the "cuda"
backend; without this build that backend compiles them on first use, see sot_engine/kernels/cuda.py).

The extensions need torch importable at build time, so install with `--no-build-isolation` after
torch (scripts/install.sh does). They are optional: no torch at build time, no compiler, or a failed
compile only prints a warning, the install goes on, and the engine runs on the torch backend; a
failed CUDA build leaves the CPU one alone. On a CPU torch nothing CUDA is attempted.
`SOT_NO_CSRC=1` skips both on purpose.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


CUDA_EXT = "sot_engine.kernels._cuda"


CUDA_LATER = "the 'cuda' kernel backend compiles it on first use instead, where nvcc is (sot_engine/kernels/cuda.py)"


def _warn(msg: str, then: str = "the 'cpp' kernel backend will be unavailable") -> None:
    print(f"WARNING (sot-engine): {msg}; {then}", file=sys.stderr)


def cuda_extension(torch):
    """`sot_engine.kernels._cuda` from csrc/cuda, or None: a CPU torch (silently), no sources, or no nvcc (a warning)."""
    folder = HERE / "csrc" / "cuda"
    sources = sorted(p.relative_to(HERE).as_posix() for pat in ("*.cpp", "*.cu") for p in folder.glob(pat))
    if not torch.version.cuda or not sources:
        return None
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    if CUDA_HOME is None:
        _warn("torch has CUDA but nvcc was not found (set CUDA_HOME); skipping sot_engine.kernels._cuda", CUDA_LATER)
        return None
    flags = {"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-lineinfo"]}
    return CUDAExtension(CUDA_EXT, sources, extra_compile_args=flags, optional=True)


# The CPU variants the kernels are compiled for (csrc/cpu/target.h): the GCC target of each, lowest first. module.cpp
# binds the widest one the CPU runs, so one build runs on any x86-64 machine.
VARIANT_TARGETS = {
    "generic": None,
    "avx2": "avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt",
    "avx512": "avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq,avx512cd",
    "amx": "avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx512bf16,amx-tile,"
           "amx-bf16",
}
# the SOT_HAS_<X> a variant defines for target.h / simd.h: X where its target has that feature
HAS_FEATURE = {"AVX2": "avx2", "AVX512": "avx512f", "AMX": "amx-tile"}


def _is_gcc() -> bool:
    import shlex
    import subprocess
    cxx = shlex.split(os.environ.get("CXX", "c++")) or ["c++"]
    try:
        out = subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "Free Software Foundation" in out and "clang" not in out.lower()


def cpu_variants() -> list[str]:
    """Every variant on x86-64 with GCC (its `#pragma GCC target` does what the wrappers need); else, or with
    SOT_CSRC_NATIVE=1, one "native" variant for the build machine (-march=native). SOT_CSRC_VARIANTS=generic,avx512
    builds a subset (a quicker rebuild while working on one)."""
    import platform
    if os.environ.get("SOT_CSRC_NATIVE") == "1" or platform.machine().lower() not in ("x86_64", "amd64") \
            or not _is_gcc():
        return ["native"]
    asked = [v for v in os.environ.get("SOT_CSRC_VARIANTS", "").split(",") if v]
    unknown = sorted(set(asked) - set(VARIANT_TARGETS))
    if unknown:
        raise SystemExit(f"SOT_CSRC_VARIANTS: unknown {unknown}; choose from {list(VARIANT_TARGETS)}")
    return [v for v in VARIANT_TARGETS if not asked or v in asked]


def _includes(path: Path, seen: set[Path]) -> list[str]:
    """The <...> includes of a source and of the csrc headers it includes, in order."""
    out: list[str] = []
    if path in seen:
        return out
    seen.add(path)
    for line in path.read_text().splitlines():
        t = line.strip()
        if t.startswith("#include <"):
            out.append(t)
        elif t.startswith('#include "'):
            out += _includes(path.parent / t.split('"')[1], seen)
    return out


def wrapper(src: str, variant: str) -> str:
    """build/csrc/variants/<variant>/<file>: the kernel file compiled for one variant (csrc/cpu/target.h). Its
    system and torch headers come first, for the baseline, and only then the pragma: so every header's inline
    function and template is compiled alike in each variant (one definition), our code for the variant, in its own
    namespace. Written only when it changes, so that ninja rebuilds only what did."""
    path = HERE / src
    lines = [f"// generated by setup.py: {src} for the {variant} CPU variant (csrc/cpu/target.h)",
             f"#define SOT_ISA_NS {variant}"]
    target = VARIANT_TARGETS[variant]
    lines += [f"#define SOT_HAS_{h} 1" for h, f in HAS_FEATURE.items() if f in (target or "").split(",")]
    lines += list(dict.fromkeys(_includes(path, set())))
    if target:
        lines.append(f'#pragma GCC target("{target}")')
    lines.append(f'#include "{path}"')
    out = HERE / "build" / "csrc" / "variants" / variant / path.name
    text = "\n".join(lines) + "\n"
    if not out.exists() or out.read_text() != text:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return out.relative_to(HERE).as_posix()


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
        _warn(f"torch is not importable at build time ({e}); skipping sot_engine.kernels._cpp "
              "(pip install -e . --no-build-isolation after torch builds it)")
        return {}

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension whose failures (compiler missing, compile error, ninja error) only warn."""

        def finalize_options(self) -> None:
            """Objects in one folder of the checkout (build/csrc), whichever command builds: an editable install and
            `pip wheel .` then share them, and ninja recompiles only what changed (flags, sources, headers)."""
            super().finalize_options()
            self.build_temp = str(HERE / "build" / "csrc")

        def run(self) -> None:
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any failure of an optional build must not fail the install
                _warn(f"building the C++ kernels failed ({type(e).__name__}: {e})")

        def build_extensions(self) -> None:
            """A failed CUDA build (nvcc/torch CUDA version mismatch, compile error) must not cost the CPU kernels:
            drop it and build the rest again (ninja keeps what was already compiled)."""
            try:
                super().build_extensions()
            except Exception as e:  # noqa: BLE001
                if not any(x.name == CUDA_EXT for x in self.extensions):
                    raise
                _warn(f"building with the CUDA kernels failed ({type(e).__name__}: {e}); building the CPU "
                      "kernels alone", CUDA_LATER)
                self.extensions = [x for x in self.extensions if x.name != CUDA_EXT]
                super().build_extensions()

        def copy_extensions_to_source(self) -> None:  # editable installs: skip what did not build
            try:
                super().copy_extensions_to_source()
            except Exception as e:  # noqa: BLE001
                _warn(f"installing the C++ kernels failed ({type(e).__name__}: {e})")

        def get_outputs(self) -> list[str]:
            return [p for p in super().get_outputs() if os.path.exists(p)]

    # -g0: no debug info (Python's flags add -g): 3-4x the library's size and link time, for 4 variants
    cflags = ["-O3", "-std=c++17", "-g0"]
    ldflags: list[str] = []
    # at::parallel_for is inline OpenMP code in torch's headers: without -fopenmp it runs serially
    if torch._C.has_openmp:
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    variants = cpu_variants()
    module = [s for s in sources if s.endswith("/module.cpp")]
    kernels = [s for s in sources if s not in module]
    if variants == ["native"]:
        cflags.append("-march=native")
        sources = kernels + module
    else:
        sources = [wrapper(src, v) for v in variants for src in kernels] + module
    cflags += [f"-DSOT_WITH_{v.upper()}=1" for v in variants]
    ext = CppExtension("sot_engine.kernels._cpp", sources, extra_compile_args=cflags, extra_link_args=ldflags,
                       optional=True)
    cuda = cuda_extension(torch)
    return {"ext_modules": [ext] + ([cuda] if cuda else []),
            "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


setup(**csrc_extensions())
