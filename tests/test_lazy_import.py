"""`import midus` and `midus --help` import neither torch nor transformers; the MIDUS classes are
still registered with transformers' auto classes whichever is imported first (issue 15 item 3).

Each case runs in a fresh interpreter: this test process has long imported both.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

import midus

# Where the imported midus lives (site-packages after `pip install .`, the checkout when editable):
# child processes import that one. The test data lives beside this file, and the children run in an
# empty folder, so that neither a source folder nor site-packages itself comes first on sys.path.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(midus.__file__)))
SAVED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "saved_v0_1_0", "hml")  # midus 0.1.0
NEUTRAL = tempfile.mkdtemp(prefix="midus-lazy-import-")
HEAVY = ("torch", "transformers", "midus_ops", "midus.modeling_midus", "midus.upscale", "midus.train")


def _python(code, *args, env=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=NEUTRAL)


def _result(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_PARSE = r"""
import json, sys
from midus.cli import build_parser, main
build_parser()
codes = {}
for argv in (["--help"], ["upscale"], ["upscale", "--help"], ["train", "--help"], ["eval", "--model", "x", "--frob"],
             ["compare", "--help"], ["study", "--help"], ["bench", "--help"]):
    try:
        main(argv)
    except SystemExit as exit_:
        codes[" ".join(argv)] = exit_.code
print(json.dumps({"heavy": [m for m in %r if m in sys.modules], "codes": codes}))
"""


def test_parser_and_help_import_no_torch_or_transformers():
    """The regression guard of item 3: the parser (with every subcommand's flags that do not live
    in midus.analyze), help and argument errors need neither torch nor transformers."""
    out = _result(_python(_PARSE % (HEAVY,)))
    assert out["heavy"] == [], out
    assert out["codes"] == {"--help": 0, "upscale": 2, "upscale --help": 0, "train --help": 0,
                            "eval --model x --frob": 2, "compare --help": 0, "study --help": 0, "bench --help": 0}


def test_import_midus_is_light():
    out = _result(_python("import json, sys, midus\nprint(json.dumps([m for m in %r if m in sys.modules]))" % (HEAVY,)))
    assert out == []


def test_midus_help_is_fast():
    """Loose bound (the guard above is the real one): about 0.3 s on 2 idle cores, against 7 s when
    `import midus` imported transformers."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    best = float("inf")
    for _ in range(3):  # the best of three: a shared machine's load spikes are not the code's
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "midus", "--help"], capture_output=True, text=True, env=env,
                             timeout=120)
        best = min(best, time.perf_counter() - t)
        assert res.returncode == 0 and res.stdout.startswith("usage: midus"), res.stderr
    assert best < 3.0, f"`python -m midus --help` took {best:.2f} s: an eager torch/transformers import?"
    res = subprocess.run([sys.executable, "-m", "midus", "upscale"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 2 and "--output" in res.stderr


_LOAD = r"""
import json, sys
order = sys.argv[1]
if order == "midus, then transformers":
    import midus
    assert "transformers" not in sys.modules
    from transformers import AutoConfig, AutoModelForCausalLM
elif order == "transformers, then midus":
    from transformers import AutoConfig, AutoModelForCausalLM
    import midus
elif order == "midus.modeling_midus first":  # the module that registers is the one importing transformers
    from midus.modeling_midus import MidusConfig
    from transformers import AutoConfig, AutoModelForCausalLM
elif order == "midus.MidusConfig first":
    import midus
    midus.MidusConfig
    from transformers import AutoConfig, AutoModelForCausalLM
elif order == "import transformers.models.auto":
    import midus
    import transformers.models.auto as auto
    AutoConfig, AutoModelForCausalLM = auto.AutoConfig, auto.AutoModelForCausalLM
import midus, transformers
model = AutoModelForCausalLM.from_pretrained(sys.argv[2])
print(json.dumps({"model": type(model).__module__ + "." + type(model).__name__,
                  "config": type(AutoConfig.for_model("midus")).__name__,
                  "hooks_left": [type(f).__name__ for f in sys.meta_path if "midus" in type(f).__module__],
                  "loader": type(transformers.__spec__.loader).__name__}))
"""


@pytest.mark.parametrize("order", ["midus, then transformers", "transformers, then midus",
                                   "midus.modeling_midus first", "midus.MidusConfig first",
                                   "import transformers.models.auto"])
def test_saved_folder_loads_after_import_midus_in_any_order(order):
    out = _result(_python(_LOAD, order, SAVED))
    assert out == {"model": "midus.modeling_midus.MidusForCausalLM", "config": "MidusConfig", "hooks_left": [],
                   "loader": "SourceFileLoader"}


_FAILING = r"""
import json, sys, warnings
import midus
try:
    import transformers  # the fake one on PYTHONPATH: raises
except ImportError as err:
    first = str(err)
print(json.dumps({"error": first, "hooks_left": [type(f).__name__ for f in sys.meta_path
                                                 if "midus" in type(f).__module__]}))
"""


def test_a_failing_transformers_import_is_left_alone(tmp_path):
    fake = tmp_path / "transformers"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('fake transformers fails')\n")
    out = _result(_python(_FAILING, env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}))
    # The error is transformers' own, and the hook waits for an import that succeeds.
    assert out == {"error": "fake transformers fails", "hooks_left": ["_PostImportFinder"]}


def test_package_names_are_lazy_but_all_there():
    import importlib

    import midus.upscale  # noqa: F401  (binds the submodule on the package: must not hide the function)

    assert callable(midus.upscale) and midus.upscale.__module__ == "midus.upscale"
    from midus import MEMORY_DEFAULTS, MidusConfig, upscale  # noqa: F401

    assert set(midus.__all__) <= set(dir(midus))
    for name in midus.__all__:
        assert getattr(midus, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        midus.nope  # noqa: B018
    importlib.reload(midus)
    assert callable(midus.upscale)
    assert sum(type(f).__name__ == "_PostImportFinder" for f in sys.meta_path) == 0  # registered: gone
