"""Models saved by earlier midus versions keep loading and computing the same.

tests/data/saved_v0_1_0/ holds tiny MIDUS models (HML, HML with out_proj="copy", PKM; non-zero
memory) saved by midus 0.1.0 before issue 12 changed the memory block's attention, with the logits
they gave then (tests/data/make_saved_models.py wrote them, once). They must load with every key
in place, give those logits, and save again under the same parameter names; and the modeling file
saved beside them must still work with the current ``midus_ops`` (trust_remote_code).

tests/data/saved_2026_12_03/ likewise holds models saved by the code just before the memory
options became ``midus_ops.MemoryOptions`` (commit fc12d47; query_norm="rms" + a learned tau, and
PKM with a learned tau; tests/data/make_saved_models_2026_12_03.py): they load with
``deterministic`` at its default.
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

DATA_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DATA = os.path.join(DATA_ROOT, "saved_v0_1_0")
VARIANTS = ["hml", "hml-copy", "pkm"]
# (folder, variant) of every saved model, oldest first
SAVED = [("saved_v0_1_0", v) for v in VARIANTS] + [("saved_2026_12_03", v) for v in ("hml-rms-learn-tau",
                                                                                   "pkm-learn-tau")]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(midus.__file__)))
# Same machine kind, same ops: only the thread count can reorder a sum.
TOL = dict(rtol=1e-5, atol=1e-6)


def _expected(folder):
    return load_file(os.path.join(DATA_ROOT, folder, "expected.safetensors"))


def _saved_keys(path):
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("folder,variant", SAVED)
def test_old_saved_model_loads_and_gives_the_same_logits(folder, variant, tmp_path):
    expected = _expected(folder)
    path = os.path.join(DATA_ROOT, folder, variant)
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    model.eval()
    assert type(model).__name__ == "MidusForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    saved_options = {k: v for k, v in json.load(open(os.path.join(path, "config.json"))).items()
                     if k in model.config.memory_options}
    assert saved_options and all(model.config.memory_options[k] == v for k, v in saved_options.items())
    assert model.config.deterministic is False  # not in these configs: its default
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


@pytest.mark.parametrize("folder", ["saved_v0_1_0", "saved_2026_12_03"])
def test_old_saved_modeling_file_runs_with_the_current_midus_ops(folder, tmp_path):
    """trust_remote_code runs the modeling file saved with the model (the old one) on the installed
    midus_ops: the layers' interface must stay compatible with it."""
    args = [os.path.join(DATA_ROOT, folder, "expected.safetensors")]
    for f, v in SAVED:
        if f == folder:
            args += [v, os.path.join(DATA_ROOT, folder, v)]
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
