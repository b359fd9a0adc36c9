"""The build (issue 15): MIDUS_BUILD's choice and its errors, the default MAX_JOBS, the build
information compiled into the extension (midus_ops.BUILD_INFO), the layout of the CUDA translation
units, and the README's set-up commands being the ones CI runs. setup.py is imported, not run
(its setup() call is under __main__); nothing here compiles."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import midus_ops

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("midus_setup_under_test", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _home():
    return "/opt/cuda-test"


def _no_home():
    return None


# ------------------------------------------------------------------------------------------------
# MIDUS_BUILD
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env", [{}, {"MIDUS_BUILD": "auto"}, {"MIDUS_BUILD": " AUTO "}, {"MIDUS_FORCE_CPU": "0"}])
def test_auto_builds_cuda_when_torch_and_toolkit_allow(setup_py, env):
    use_cuda, home, why = setup_py.decide_build(env, "13.0", _home)
    assert use_cuda and home == _home() and "auto" in why


def test_auto_falls_back_to_cpu_saying_why(setup_py):
    assert setup_py.decide_build({}, None, _home)[0::2] == (False, f"this torch ({torch.__version__}) is a CPU-only build")
    use_cuda, home, why = setup_py.decide_build({}, "13.0", _no_home)
    assert not use_cuda and home is None and "no CUDA toolkit found" in why and "CUDA_HOME" in why


@pytest.mark.parametrize("env,why", [({"MIDUS_BUILD": "cpu"}, "MIDUS_BUILD=cpu"),
                                     ({"MIDUS_FORCE_CPU": "1"}, "MIDUS_FORCE_CPU is set"),
                                     ({"MIDUS_FORCE_CPU": "1", "MIDUS_BUILD": "auto"}, "MIDUS_FORCE_CPU is set"),
                                     ({"MIDUS_FORCE_CPU": "1", "MIDUS_BUILD": "cpu"}, "MIDUS_BUILD=cpu")])
def test_cpu_is_cpu_even_where_cuda_is_possible(setup_py, env, why):
    assert setup_py.decide_build(env, "13.0", _home) == (False, None, why)


def test_cuda_never_silently_builds_cpu(setup_py):
    with pytest.raises(setup_py.BuildConfigError, match=r"MIDUS_BUILD=cuda, but no CUDA toolkit found"):
        setup_py.decide_build({"MIDUS_BUILD": "cuda"}, "13.0", _no_home)
    with pytest.raises(setup_py.BuildConfigError, match=r"MIDUS_BUILD=cuda, but this torch .* is a CPU-only build"):
        setup_py.decide_build({"MIDUS_BUILD": "cuda"}, None, _home)
    assert setup_py.decide_build({"MIDUS_BUILD": "cuda"}, "13.0", _home) == (True, _home(), "MIDUS_BUILD=cuda")


@pytest.mark.parametrize("env,msg", [({"MIDUS_BUILD": "gpu"}, r"MIDUS_BUILD='gpu' is not one of auto, cuda, cpu"),
                                     ({"MIDUS_BUILD": "cuda", "MIDUS_FORCE_CPU": "1"}, r"MIDUS_BUILD=cuda and MIDUS_FORCE_CPU")])
def test_bad_requests_name_the_variable(setup_py, env, msg):
    with pytest.raises(setup_py.BuildConfigError, match=msg):
        setup_py.decide_build(env, "13.0", _home)


def test_setup_py_refuses_a_bad_value_before_compiling(tmp_path):
    """The real entry point: a bad MIDUS_BUILD stops the build at once, naming the variable."""
    env = dict(os.environ, MIDUS_BUILD="sometimes")
    r = subprocess.run([sys.executable, str(ROOT / "setup.py"), "--name"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "MIDUS_BUILD='sometimes' is not one of auto, cuda, cpu" in r.stderr, r.stderr[-2000:]


def test_the_decision_reaches_the_terminal_past_a_quiet_pip(setup_py, monkeypatch, capsys):
    """pip captures the build's stderr (shown with -v); /dev/tty it cannot capture. Without a
    terminal (CI) the line goes to stderr alone, silently."""
    import io

    tty = io.StringIO()
    tty.close = lambda: None

    def fake_open(path, mode="r", *a, **k):
        assert path == "/dev/tty" and mode == "w"
        return tty

    monkeypatch.setattr(setup_py, "open", fake_open, raising=False)
    monkeypatch.setattr(sys, "argv", ["setup.py", "dist_info", "--output-dir", "x"])  # pip's metadata step
    setup_py._announce("metadata only")
    assert tty.getvalue() == "" and "[midus setup] metadata only" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["setup.py", "bdist_wheel"])
    setup_py._announce("building the CUDA extension (test)")
    assert tty.getvalue() == "[midus setup] building the CUDA extension (test)\n"
    assert "[midus setup] building the CUDA extension (test)" in capsys.readouterr().err

    def no_tty(*a, **k):
        raise OSError(6, "No such device or address")

    monkeypatch.setattr(setup_py, "open", no_tty, raising=False)
    setup_py._announce("no terminal")
    assert "[midus setup] no terminal" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# MAX_JOBS
# ------------------------------------------------------------------------------------------------
def test_default_max_jobs_from_cores_and_memory(setup_py):
    gib = 1 << 30
    per = setup_py.MEM_PER_JOB_GIB
    assert setup_py.default_max_jobs(2, 22 * gib) == 2            # this project's machine: cores decide
    assert setup_py.default_max_jobs(16, 128 * gib) == 16         # a GPU machine: cores decide
    assert setup_py.default_max_jobs(64, 16 * gib) == int(16 // per)  # memory decides
    assert setup_py.default_max_jobs(8, 1 * gib) == 1             # never zero
    assert setup_py.default_max_jobs(4, None) == 4                # memory unknown
    assert per >= 1.55 * 1.2, "below the measured peak of one nvcc job (1.55 GB) plus a margin"


# ------------------------------------------------------------------------------------------------
# The build information in the extension
# ------------------------------------------------------------------------------------------------
def test_build_info_header_round_trips(setup_py, tmp_path):
    info = {"with_cuda": True, "why": 'quotes " and \\ backslashes', "cuda_arch_list": "8.0;9.0+PTX"}
    setup_py.write_build_info(info, str(tmp_path))
    text = (tmp_path / "midus_build_info.h").read_text()
    literal = re.search(r"#define MIDUS_BUILD_INFO_JSON (.*)$", text, re.M).group(1)
    assert json.loads(json.loads(literal)) == info  # a C string literal is a JSON string here (ASCII)
    mtime = (tmp_path / "midus_build_info.h").stat().st_mtime_ns
    setup_py.write_build_info(info, str(tmp_path))  # unchanged: not rewritten, so nothing recompiles
    assert (tmp_path / "midus_build_info.h").stat().st_mtime_ns == mtime


def test_build_info_agrees_with_the_loaded_extension():
    info = midus_ops.BUILD_INFO
    if not midus_ops.EXTENSION_AVAILABLE:
        assert info is None
        pytest.skip(f"no compiled extension: {midus_ops.EXTENSION_ERROR}")
    assert info is not None, "the loaded extension has no build information (built before it existed?)"
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("midus_ops::hive_gather", "CUDA")
    assert info["with_cuda"] is has_cuda
    assert torch._C._dispatch_has_kernel_for_dispatch_key("midus_ops::pk_topk_backward", "CUDA") is has_cuda
    assert info["requested"] in ("auto", "cuda", "cpu") and info["why"]
    assert info["torch"] == torch.__version__, f"built against torch {info['torch']}, running {torch.__version__}"
    assert info["max_jobs"] >= 1
    if has_cuda:
        assert info["torch_cuda"] == torch.version.cuda and info["cuda_arch_list"] and info["cuda_home"]
    else:
        assert info["cuda_arch_list"] is None


# ------------------------------------------------------------------------------------------------
# The CUDA translation units
# ------------------------------------------------------------------------------------------------
def test_cuda_sources_are_every_unit(setup_py):
    got = setup_py.cuda_sources(str(ROOT))
    want = sorted(f"csrc/cuda/{p.name}" for p in list(CUDA_DIR.glob("*.cu")) + list(CUDA_DIR.glob("*.cpp")))
    assert got == want
    assert len([s for s in got if s.endswith(".cu")]) >= 5, "the kernel families compile in separate units"


def test_each_entry_point_is_defined_in_exactly_one_unit():
    """launch.h declares the entry points of the CUDA units and the ATen services of cuda_dev.cpp."""
    decl = re.compile(r"^(?:void\*?|int64_t|bool|cudaStream_t|CudaWorkspaces\*) (\w+)\(", re.M)
    decls = decl.findall((CUDA_DIR / "launch.h").read_text())
    assert len(decls) >= 11, decls
    units = {p.name: p.read_text() for p in list(CUDA_DIR.glob("*.cu")) + list(CUDA_DIR.glob("*.cpp"))}
    for name in decls:
        where = [u for u, text in units.items() if name in decl.findall(text)]
        assert len(where) == 1, f"{name} is defined in {where or 'no unit'}"


def test_nvcc_never_parses_the_torch_headers():
    """nvcc parses a unit's headers once per architecture: ATen and torch belong to the plain C++
    files (the glue, which also holds every registration, and cuda_dev.cpp)."""
    for p in sorted(CUDA_DIR.glob("*.cu")) + sorted(CUDA_DIR.glob("*.cuh")) + [CUDA_DIR / "launch.h"]:
        text = p.read_text()
        inc = re.findall(r'#include [<"]((?:ATen|torch)/[^>"]+)[>"]', text)
        assert not inc, f"{p.name} includes {inc}"
        assert "TORCH_LIBRARY" not in text, p.name
    glue = "".join(p.read_text() for p in CUDA_DIR.glob("*.cpp"))
    for op in ("pk_topk", "pk_topk_backward", "hive_gather", "hive_gather_backward"):
        assert f'm.impl("{op}"' in glue


# ------------------------------------------------------------------------------------------------
# README set-up = what CI runs
# ------------------------------------------------------------------------------------------------
def _readme_setup() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("## Set-up"):text.index("\n## ", text.index("## Set-up") + 1)]


def test_ci_installs_as_the_readme_says():
    """.ci/run's install commands are the README's GPU-machine set-up commands, verbatim."""
    setup = _readme_setup()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip().startswith(("pip install", "python -m venv", "pytest"))]
    assert ci, "no install commands in .ci/run"
    for cmd in ci:
        assert cmd in setup or cmd in (ROOT / "README.md").read_text(), f".ci/run runs `{cmd}`, the README does not say it"
    for needed in ("MIDUS_BUILD", "pip install -v", "download.pytorch.org/whl/cpu", "-m venv", "Python 3."):
        assert needed in setup, f"the README's Set-up does not mention {needed}"
