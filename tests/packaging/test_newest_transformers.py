"""Where CI meets the newest releases: everything else runs on the pinned versions (constraints.txt), this test
upgrades transformers, and whatever it pulls in (HF's own `kernels` package, huggingface_hub, tokenizers), to the
newest the registry offers, in a venv layered over the test environment. Then, from an empty folder, one process
loads a model with transformers and runs sot_engine beside it: the two must not shadow each other's modules, and
our engine must still give transformers' tokens. Needs the package registry; SOT_OFFLINE=1 skips it."""
from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("SOT_OFFLINE") == "1", reason="SOT_OFFLINE=1: no package registry")

SCRIPT = r'''
import json, sys
import torch
import transformers.models.llama
from transformers import LlamaConfig, LlamaForCausalLM
from sot_engine import LLM, SamplingParams, SoT

folder = sys.argv[1]
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
LlamaForCausalLM(cfg).save_pretrained(folder)
hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
prompt = torch.randint(3, 320, (1, 12), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[0, 12:].tolist()
llm = LLM(folder, dtype=torch.float64)
ours = llm.generate([prompt[0].tolist()], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].token_ids
ans = SoT("default").answer("How can I keep my houseplants alive?", mode="sot")
import kernels  # HF's package, which transformers depends on: importable beside ours
print(json.dumps({"transformers": transformers.__version__, "hf_kernels": getattr(kernels, "__file__", None),
                  "same_tokens": ours == ref, "ours": ours, "ref": ref, "sot_mode": ans.mode,
                  "sot_text": ans.text, "sot_file": sys.modules["sot_engine"].__file__}))
'''


def test_newest_transformers_and_sot_engine_in_one_process(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    # --system-site-packages layers over the base interpreter's packages only: where the tests run in a venv
    # themselves, its site dirs (and their .pth files: an editable install's finder) are added after the new one's
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    Path(purelib, "_test_env.pth").write_text(
        "".join(f"import site; site.addsitedir({d!r})\n" for d in site.getsitepackages()))
    keep = tmp_path / "keep-torch.txt"  # the newest transformers must not drag in another torch
    keep.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    r = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--upgrade", "transformers",
                        "-c", str(keep)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    r = subprocess.run([py, "-c", SCRIPT, str(tmp_path / "tiny")], capture_output=True, text=True, timeout=900,
                       cwd=empty, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.splitlines()[-1])
    major = int(got["transformers"].split(".")[0])
    assert major >= 5, got["transformers"]  # the releases that depend on HF's `kernels` package
    assert got["same_tokens"], (got["ours"], got["ref"])
    assert got["sot_mode"] in ("sot", "normal") and got["sot_text"].strip()
    assert got["hf_kernels"] and "sot_engine" not in got["hf_kernels"]
    print(f"newest transformers {got['transformers']} beside sot_engine from {got['sot_file']}")
