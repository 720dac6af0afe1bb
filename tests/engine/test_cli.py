"""`python -m sot_engine generate` (the engine's CLI under `sot`) end to end in a subprocess."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import requires_smollm2

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sot_engine", "generate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@requires_smollm2
def test_cli_answers_with_the_default_model():
    r = run("What is the capital of France?", "Name a primary color.", "--max-tokens", "12", "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(l) for l in r.stdout.splitlines()]
    assert len(rows) == 2 and all(row["tokens"] > 0 and row["text"].strip() for row in rows)
    assert "Paris" in rows[0]["text"]


def test_cli_reports_bad_input_clearly(tmp_path):
    r = run("hi", "--model", str(tmp_path / "missing.gguf"))
    assert r.returncode == 2 and "missing.gguf" in r.stderr and "Traceback" not in r.stderr
    r = run("hi", "--model", "random:tiny", "--temperature", "-1")
    assert r.returncode == 2 and "temperature" in r.stderr


def test_cli_weights_flag(tiny_chat_dir):
    r = run("hi", "--model", str(tiny_chat_dir), "--weights", "int8", "--max-tokens", "3", "--json")
    assert r.returncode == 0, r.stderr
    assert 1 <= json.loads(r.stdout.splitlines()[0])["tokens"] <= 3
    r = run("hi", "--model", str(tiny_chat_dir), "--weights", "fp8")
    assert r.returncode == 2 and "invalid choice: 'fp8'" in r.stderr
