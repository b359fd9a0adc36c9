"""Models saved by earlier midus versions keep loading and computing the same.

tests/data/saved_v0_1_0/ holds tiny MIDUS models (HML, HML with out_proj="copy", PKM; non-zero
memory) saved by midus 0.1.0 before issue 12 changed the memory block's attention, with the logits
they gave then (tests/data/make_saved_models.py wrote them, once). They must load with every key
in place, give those logits, and save again under the same parameter names; and the modeling file
saved beside them must still work with the current ``midus_ops`` (trust_remote_code).
"""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

warnings.filterwarnings("ignore", message=".*midus_ops.*")

import midus  # noqa: E402,F401  (registers model_type "midus")
from transformers import AutoModelForCausalLM  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "saved_v0_1_0")
VARIANTS = ["hml", "hml-copy", "pkm"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(midus.__file__)))
# Same machine kind, same ops: only the thread count can reorder a sum.
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def expected():
    return load_file(os.path.join(DATA, "expected.safetensors"))


def _saved_keys(path):
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("variant", VARIANTS)
def test_old_saved_model_loads_and_gives_the_same_logits(variant, expected, tmp_path):
    path = os.path.join(DATA, variant)
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    model.eval()
    assert type(model).__name__ == "MidusForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected[f"logits/{variant}"], **TOL)
    # Saved again by the current code: the same parameter names, so either version reads it.
    model.save_pretrained(tmp_path)
    assert _saved_keys(tmp_path) == _saved_keys(path)


_REMOTE = r"""
import json, sys, torch, warnings
warnings.filterwarnings("ignore")
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
expected = load_file(sys.argv[1])
out = {}
for variant, path in zip(sys.argv[2::2], sys.argv[3::2]):
    m = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    with torch.no_grad():
        got = m(expected["input_ids"]).logits
    out[variant] = dict(cls=type(m).__module__, err=(got - expected["logits/" + variant]).abs().max().item())
out["midus_imported"] = [k for k in sys.modules if k == "midus" or k.startswith("midus.")]
print("RESULT" + json.dumps(out))
"""


def test_old_saved_modeling_file_runs_with_the_current_midus_ops(tmp_path):
    """trust_remote_code runs the modeling file saved with the model (the old one) on the installed
    midus_ops: the layers' interface must stay compatible with it."""
    args = [os.path.join(DATA, "expected.safetensors")]
    for v in VARIANTS:
        args += [v, os.path.join(DATA, v)]
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, "-c", _REMOTE, *args], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    out = json.loads(line[0][len("RESULT"):])
    assert out.pop("midus_imported") == []
    for v, r in out.items():
        assert r["cls"].startswith("transformers_modules."), r
        assert r["err"] <= 1e-5, (v, r)
