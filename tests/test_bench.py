"""The benchmark suite's own code (midus.bench, benchmarks/), on CPU at tiny sizes.

Every subject runs (--quick) and writes a well-formed results file; the plot script makes PNGs
from it; parts, budget, errors and the results file's merging behave. No timing assertions: speed
is what the suite reports, not what the tests check.
"""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from midus.bench import SUBJECTS, add_arguments, core, run
from midus.bench.cli import parse_parts
from midus.bench.plot import plot_results
from midus.bench.report import all_records, check_targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env():
    """The environment of a benchmarks/*.py child: it must import the midus this process imported
    (site-packages under CI, with its compiled extension), not the source folder ROOT, whose
    midus_ops has no built _C there (the child would time the reference and say nothing)."""
    import midus

    installed = os.path.dirname(os.path.dirname(os.path.abspath(midus.__file__)))
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([installed] + rest)}
REQUIRED = ("subject", "case", "impl", "mode", "baseline", "dtype", "shape", "device", "torch", "cuda", "git_commit")


def parse(argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        status = run(parse(["--quick", "--device", "cpu", "--out", str(out), "--quiet"]))
    finally:
        torch.set_num_threads(threads)
    files = [f for f in os.listdir(out) if f.endswith(".json")]
    assert len(files) == 1, files
    return status, os.path.join(out, files[0])


def test_every_subject_runs_and_writes_a_well_formed_file(quick_results):
    status, path = quick_results
    assert status == 0
    assert os.path.basename(path).startswith("bench_quick_cpu_")
    data = core.load_results(path)
    assert set(data["subjects"]) == set(SUBJECTS)
    for subject, sec in data["subjects"].items():
        assert sec["complete"], subject
        assert sec["env"]["torch"] == torch.__version__ and "git_commit" in sec["env"]
        recs = sec["records"]
        assert recs, subject
        for r in recs:
            missing = [k for k in REQUIRED if k not in r]
            assert not missing, (subject, r.get("impl"), missing)
            assert r["subject"] == subject
            if "time_ms" in r:
                t = r["time_ms"]
                assert 0 <= t["min"] <= t["median"] <= t["max"] and t["reps"] >= 1
                assert r["peak_mib"] >= 0 and r["memory_method"].startswith(("VmHWM", "ru_maxrss"))
        # every subject measured its midus implementation(s) and its baseline without error
        timed = {(r["case"], r["impl"], r["mode"]) for r in recs if "time_ms" in r}
        assert {r["baseline"] for r in recs} <= {i for _, i, _ in timed}, subject
        errors = [(r["case"], r["impl"], r["error"]) for r in recs if "error" in r]
        assert not errors, errors


def test_ratios_come_from_the_same_run(quick_results):
    _, path = quick_results
    recs = all_records(core.load_results(path))
    checked = 0
    for r in recs:
        if "time_ms" not in r:
            continue
        b = next(x for x in recs if (x["subject"], x["case"], x["impl"], x["mode"]) ==
                 (r["subject"], r["case"], r["baseline"], r["mode"]))
        assert r["speedup"] == pytest.approx(b["time_ms"]["median"] / r["time_ms"]["median"])
        twin = next((x for x in recs if (x["subject"], x["case"], x["impl"], x["mode"]) ==
                     (r["subject"], r["case"], r["impl"] + "[eager]", r["mode"])), None)
        if twin is not None:
            assert r["speedup_vs_eager"] == pytest.approx(twin["time_ms"]["median"] / r["time_ms"]["median"])
            checked += 1
    assert checked >= 5  # layers, blocks, models, decode have [eager] twins


def test_subject_contents(quick_results):
    _, path = quick_results
    recs = all_records(core.load_results(path))
    got = {(r["subject"], r["case"], r["impl"], r["mode"]) for r in recs}
    for case in ("pk_topk", "hive_gather_proj", "hive_gather_noproj", "hml"):
        for impl in ("midus_ops", "eager", "reference"):
            assert ("ops", case, impl, "fwd_bwd") in got
    assert ("ops", "hive_gather_proj", "F.embedding_bag", "fwd") in got
    for impl in ("base", "dus", "midus", "midus[eager]", "llama_pro"):
        assert ("models", "train", impl, "train_step") in got
        assert ("models", "generate", impl, "generate_b1") in got
    models = {r["impl"]: r for r in recs if r["subject"] == "models" and r["mode"] == "train_step"}
    assert models["dus"]["params"] > models["midus"]["params"] > models["base"]["params"]
    assert models["midus"]["tokens_per_s"] > 0
    assert {r["case"] for r in recs if r["subject"] == "decode"} == {"N=1", "N=8", "N=64"}
    sweeps = {r["sweep"] for r in recs if r["subject"] == "scaling"}
    assert sweeps == {"N", "n", "k", "d_z"}
    noproj = [r for r in recs if r["case"] == "hive_gather_noproj" and r["mode"] == "fwd" and "time_ms" in r]
    assert all(r["copy_gbps"] > 0 and r["gathered_gbps"] > 0 for r in noproj)
    # GPU targets are reported on CPU, as informative only
    targets = check_targets(recs, "cpu", "quick")
    assert targets and not any(t["applies"] for t in targets)


def test_plot_script_makes_pngs(quick_results, tmp_path):
    _, path = quick_results
    pngs = plot_results(path, str(tmp_path))
    names = {os.path.basename(p).rsplit("_", 1)[1] for p in pngs}
    assert names == {"speedup.png", "baseline.png", "memory.png", "scaling.png"}
    for p in pngs:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(p) > 5000
    # the same through benchmarks/plot.py (what the README tells users to run)
    out = tmp_path / "script"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "plot.py"), path, "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=child_env())
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("*.png"))) == 4


def test_markdown_tables_written(quick_results):
    _, path = quick_results
    md = open(os.path.splitext(path)[0] + ".md").read()
    assert "## Key figures" in md and "## All measurements" in md and "| ops | hml | midus_ops |" in md


def test_parts_and_bad_input():
    assert list(parse_parts([])) == list(SUBJECTS)
    assert parse_parts(["models.train", "ops.hml", "ops.pk_topk"]) == {"models": ["train"], "ops": ["hml", "pk_topk"]}
    assert parse_parts(["ops.hml", "ops"]) == {"ops": None}
    assert parse_parts(["scaling.n"]) == {"scaling": ["n"]}
    with pytest.raises(ValueError, match="PART 'opz'"):
        parse_parts(["opz"])
    with pytest.raises(ValueError, match="unknown case 'nope' of ops"):
        parse_parts(["ops.nope"])
    with pytest.raises(ValueError, match="--reps"):
        run(parse(["ops", "--quick", "--reps", "0"]))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda"):
            run(parse(["ops", "--device", "cuda"]))


def test_named_case_rerun_keeps_the_others(tmp_path):
    argv = ["--quick", "--device", "cpu", "--out", str(tmp_path), "--quiet"]
    assert run(parse(["decode"] + argv)) == 0
    path = next(tmp_path.glob("*.json"))
    first = core.load_results(str(path))["subjects"]["decode"]["records"]
    assert run(parse(["decode.N=8", "layers"] + argv)) == 0
    data = core.load_results(str(path))
    assert set(data["subjects"]) == {"decode", "layers"}
    again = data["subjects"]["decode"]["records"]
    assert sorted(r["case"] for r in again) == sorted(r["case"] for r in first)
    # N=8 was measured again, N=1 and N=64 kept from the first run
    keep = [r for r in first if r["case"] != "N=8"]
    assert all(r in again for r in keep)
    assert not any(r in again for r in first if r["case"] == "N=8" and "time_ms" in r)


def test_failures_and_budget_are_recorded_not_raised(tmp_path):
    ctx = core.Context("cpu", "quick", reps=2, warmup=1, verbose=False)

    def boom():
        raise RuntimeError("out of memory (simulated)")

    x = torch.randn(8)
    recs = ctx.run_case("t", "c", {"ok": core.Impl(modes={"fwd": lambda: x * 2}), "bad": core.Impl(modes={"fwd": boom}),
                                   "unbuilt": core.Impl(setup_error="no kernel")},
                        baseline="ok", shape={"n": 8}, modes=["fwd"])
    by = {r["impl"]: r for r in recs}
    assert "time_ms" in by["ok"] and by["ok"]["speedup"] == 1.0
    assert "simulated" in by["bad"]["error"] and "time_ms" not in by["bad"]
    assert by["unbuilt"]["error"] == "no kernel"
    ctx.budget = core.Budget(1e-9)
    recs = ctx.run_case("t", "late", {"ok": core.Impl(modes={"fwd": lambda: x * 2})}, baseline="ok", shape={},
                        modes=["fwd"])
    assert recs[0]["skipped"] == "time budget exhausted"


def test_cpu_peak_memory_sees_torch_allocations():
    n = 64 * 2 ** 20 // 4  # 64 MiB of float32, written (pages touched)
    m = core.peak_memory(lambda: torch.ones(n), "cpu")
    assert 48 <= m["peak_extra_mib"] <= 200, m
    small = core.peak_memory(lambda: torch.ones(16), "cpu")
    assert small["peak_extra_mib"] < 16, small


def test_eager_ops_twin_restores_the_layers_ops():
    """The "[eager]" twins choose the registered eager implementation per layer and restore it;
    nothing in midus_ops.layers is overwritten (it has no module-level op names to patch)."""
    import midus_ops
    import midus_ops.layers as layers
    from midus.bench.baselines import eager_ops, hml_eager, HML_IMPLS, with_eager_ops

    assert not hasattr(layers, "pk_topk") and not hasattr(layers, "hive_gather")
    hml = midus_ops.HeadwiseMemoryLayer(2, 8, n=6, k=3, d_z=12)
    torch.nn.init.normal_(hml.bank)
    box = torch.nn.Sequential(hml)
    x = torch.randn(5, 2, 8)
    with eager_ops(box):
        assert hml.ops_implementation == "eager"
        y_eager = hml(x)
    assert hml.ops_implementation == "midus_ops"
    torch.testing.assert_close(y_eager, hml(x))  # same op, other code (no ties in random fp32 scores)
    calls = []
    wrapped = with_eager_ops(lambda: calls.append(hml.ops_implementation), box)
    wrapped()
    assert calls == ["eager"] and hml.ops_implementation == "midus_ops"
    with pytest.raises(TypeError, match="module="):
        with_eager_ops(lambda: None)
    # the eager baseline computes the same op (no ties in random fp32 scores)
    g = torch.Generator().manual_seed(1)
    q, sk = torch.randn(16, 2, 8, generator=g), torch.randn(2, 2, 6, 4, generator=g)
    bank, proj = torch.randn(36, 12, generator=g), torch.randn(2, 12, 8, generator=g)
    torch.testing.assert_close(hml_eager(q, sk, 3, bank, proj), HML_IMPLS["reference"](q, sk, 3, bank, proj))


@pytest.mark.compile
def test_compile_baseline_and_subject_script(tmp_path):
    """The torch.compile baseline runs (ops.pk_topk, --compile), through benchmarks/bench_ops.py."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_ops.py"), "pk_topk", "--quick",
                           "--compile", "--out", str(tmp_path), "--quiet"], capture_output=True, text=True,
                          timeout=600, env=child_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = all_records(json.loads(next(tmp_path.glob("*.json")).read_text()))
    comp = [r for r in recs if r["impl"] == "compile(eager)"]
    assert {r["mode"] for r in comp} == {"fwd", "fwd_bwd"} and all("time_ms" in r for r in comp), comp


def test_gpu_scripts_parse():
    for script in ("gpu_check.sh", "gpu_suite.sh"):
        subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", script)], check=True)


# --------------------------------------------------------------------- target checks (issue 12 item 9)

def _record(subject, case, impl, mode, baseline, **fields):
    return dict(subject=subject, case=case, impl=impl, mode=mode, baseline=baseline, **fields)


def _records_for(target, value):
    """Made-up records of one target: its implementation with ``value`` in the target's field,
    and a measured baseline."""
    subj, case, impl, mode, fld = target[:5]
    baseline = {"ops": "eager", "blocks": "dus_block", "models": "base", "decode": "ffn"}[subj]
    return [_record(subj, case, impl, mode, baseline, time_ms={"median": 1.0}, **{fld: value}),
            _record(subj, case, baseline, mode, baseline, time_ms={"median": 2.0})]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_check_targets_on_both_sides_of_each_limit(device):
    """Every target, with a value 1% inside and 1% outside its limit (and exactly at it): met
    follows the limit's direction; "about" targets are never met or missed."""
    from midus.bench.report import TARGETS, targets_table

    for target in TARGETS:
        subj, case, impl, mode, fld, op, limit, on, what = target
        if on == "cpu" and device != "cpu":
            assert what not in {t["target"] for t in check_targets(_records_for(target, limit), device, "full")}
            continue
        inside, outside = (1.01 * limit, 0.99 * limit) if op == ">=" else (0.99 * limit, 1.01 * limit)
        for value, expected in ((inside, True), (limit, True), (outside, False)):
            got = [t for t in check_targets(_records_for(target, value), device, "full") if t["target"] == what]
            assert len(got) == 1, (what, got)
            t = got[0]
            assert t["value"] == value and t["limit"] == limit and t["applies"] == (on == device)
            assert t["met"] is (None if op == "~" else expected), (what, value, t)
            table = targets_table(got)
            # Only a target judged on its own device and sizes can read as a failure.
            assert ("NO" in table) == (t["met"] is False and t["applies"])
            assert ("not judged" in table) == (not t["applies"])
    # --quick sizes are never what a target is set for
    target = TARGETS[0]
    assert not check_targets(_records_for(target, 1e9), target[7], "quick")[0]["applies"]


def test_check_targets_reports_a_failed_run_as_not_met():
    """A target whose baseline (or implementation) failed has no value: reported not met, saying
    why, instead of vanishing from the table; a skipped one is reported as not measured."""
    from midus.bench.report import targets_table

    def one(records):
        got = [t for t in check_targets(records, "cuda", "full") if t["target"] == "HML op fwd >= 20x eager"]
        assert len(got) == 1, got
        return got[0]

    ok = _record("ops", "hml", "midus_ops", "fwd", "eager", time_ms={"median": 1.0})
    t = one([ok, _record("ops", "hml", "eager", "fwd", "eager", error="RuntimeError: out of memory")])
    assert t["met"] is False and t["value"] is None and "baseline eager failed" in t["why"] and "memory" in t["why"]
    assert "NO" in targets_table([t]) and "baseline eager failed" in targets_table([t])
    t = one([ok])  # the baseline has no record at all
    assert t["met"] is False and "baseline eager not measured" in t["why"]
    t = one([_record("ops", "hml", "midus_ops", "fwd", "eager", error="CUDA error: an illegal memory access"),
             _record("ops", "hml", "eager", "fwd", "eager", time_ms={"median": 9.0})])
    assert t["met"] is False and "midus_ops failed: CUDA error" in t["why"]
    t = one([ok, _record("ops", "hml", "eager", "fwd", "eager", skipped="time budget exhausted")])
    assert t["met"] is None and "skipped" in t["why"]
    # a subject that did not run at all reports nothing
    assert check_targets([], "cuda", "full") == []


def test_benchmark_scripts_import_the_midus_under_test(tmp_path):
    """benchmarks/*.py children (started as the tests start them) import the same midus and
    midus_ops as this process, so they measure the build under test."""
    import midus
    import midus_ops

    code = ("import sys; sys.path.insert(0, sys.argv[1]); import _entry, midus, midus_ops; "
            "print(midus.__file__); print(midus_ops.__file__); print(midus_ops.EXTENSION_AVAILABLE)")
    proc = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "benchmarks")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [midus.__file__, midus_ops.__file__, str(midus_ops.EXTENSION_AVAILABLE)]


def test_subject_script_help_names_only_its_cases():
    import argparse

    from midus.bench.cli import add_arguments

    p = argparse.ArgumentParser(prog="bench_ops.py")
    add_arguments(p, "ops")
    text = p.format_help()
    assert "cases of ops" in text and "decode.N=1" not in text and "scaling" not in text
