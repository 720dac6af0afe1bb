"""The one import package: its layers import only downward, it never reaches into the repository's other
folders, and its CLI parses without loading torch."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "sot_engine"
# what each layer may not import: the engine knows nothing of SoT, the kernels nothing of either
FORBIDDEN = {"engine": ("sot_engine.sot",), "kernels": ("sot_engine.engine", "sot_engine.sot")}
# repository folders and the old top-level names: installed code never imports them
OUTSIDE = ("benchmarks", "tests", "engine", "kernels", "sot")


def imports(path: Path, root: Path = ROOT) -> list[str]:
    """Every module a file under `root` imports, absolute, relative imports resolved against its package."""
    tree = ast.parse(path.read_text(), str(path))
    package = path.relative_to(root).parent.parts  # the package a relative import starts from
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - (node.level - 1)]) if node.level else ""
            mod = ".".join(p for p in (base, node.module or "") if p)
            out += [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant):
            out.append(node.args[0].value)
    return out


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_package_has_its_modules():
    names = {p.relative_to(PACKAGE).as_posix() for p in sources()}
    assert {"engine/llm.py", "kernels/reference.py", "sot/driver.py", "sot/cli.py", "__main__.py"} <= names


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")
def test_every_package_data_file_is_in_git():
    """A data file the wheel ships but git ignores works here and is missing from every fresh clone."""
    import tomllib
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    files = [f.relative_to(ROOT).as_posix() for pkg, globs in patterns.items() for g in globs
             for f in (ROOT / pkg.replace(".", "/")).glob(g)]
    assert files
    tracked = set(subprocess.run(["git", "ls-files", "--", *files], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split())
    assert sorted(set(files) - tracked) == []


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downward(layer):
    bad = [(p.relative_to(ROOT).as_posix(), m) for p in (PACKAGE / layer).rglob("*.py") for m in imports(p)
           if m.startswith(FORBIDDEN[layer])]
    assert not bad, bad


def test_installed_code_never_imports_the_repository_or_old_names():
    bad = [(p.relative_to(ROOT).as_posix(), m) for p in sources() for m in imports(p)
           if m.split(".")[0] in OUTSIDE]
    assert not bad, bad


def test_the_import_walker_sees_relative_and_lazy_imports(tmp_path):
    # the checks above are only as good as this walker: it must resolve what a careless edit would write
    f = tmp_path / "sot_engine" / "engine" / "probe.py"
    f.parent.mkdir(parents=True)
    f.write_text("from ..sot import driver\nfrom . import llm\nimport importlib\n"
                 "importlib.import_module('benchmarks.common')\n")
    got = set(imports(f, root=tmp_path))
    assert {"sot_engine.sot", "sot_engine.sot.driver", "sot_engine.engine.llm", "benchmarks.common"} <= got


def test_cli_help_and_the_package_import_without_torch():
    code = ("import sys, sot_engine, sot_engine.sot\n"
            "from sot_engine.sot.cli import parser\n"
            "parser().format_help()\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert callable(sot_engine.SoT) and 'torch' in sys.modules\n")  # and the lazy names still resolve
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_python_m_sot_engine_is_the_sot_command():
    r = subprocess.run([sys.executable, "-m", "sot_engine", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and all(c in r.stdout for c in ("ask", "compare", "bench", "serve", "generate"))
    r = subprocess.run([sys.executable, "-m", "sot_engine", "generate", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--max-tokens" in r.stdout, r.stderr


def test_sot_ask_in_a_pipe_loads_only_what_it_uses(tiny_chat_dir):
    """`sot ask` answering into a pipe: no rich (the live view is for terminals), and none of the optional
    stacks (triton, transformers, the server's)."""
    code = ("import io, sys, contextlib\n"
            "from sot_engine.sot.cli import main\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            f"    rc = main(['ask', 'How to sleep?', '--model', {str(tiny_chat_dir)!r}, '--point-max-tokens', '4',"
            " '--normal-max-tokens', '4', '--skeleton-max-tokens', '8'])\n"
            "assert rc == 0 and 'route:' in out.getvalue(), out.getvalue()\n"
            "heavy = {'rich', 'triton', 'transformers', 'fastapi', 'uvicorn', 'pydantic'}\n"
            "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
