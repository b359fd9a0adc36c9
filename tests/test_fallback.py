"""The pure-PyTorch fallback (spec 1, last paragraph; issue 2): if the compiled extension
``midus_ops._C`` cannot load, ``import midus_ops`` warns once with ``MidusExtensionWarning``
naming the reason, sets ``EXTENSION_AVAILABLE = False``, and every op and layer still works,
giving the reference's results.

Each case runs in a fresh interpreter (``sys.executable``) because the extension is loaded, and
the torch.library registrations made, once per process. The child runs from an empty temporary
folder so that it imports the installed package, not a source checkout in the working directory
(CI runs ``pytest tests`` from the repository root, whose midus_ops/ has no built ``_C``).

Ways of making the extension unavailable:
* ``loader``: a ``sys.meta_path`` finder hands ``midus_ops._C`` a loader that raises
  ImportError, as a ``.so`` built against another torch does ("undefined symbol").
* ``finder``: a ``sys.meta_path`` finder whose ``find_spec`` itself raises ImportError for
  ``midus_ops._C`` (an import hook refusing the module).
* ``env``: ``MIDUS_OPS_DISABLE_EXTENSION=1``.
* ``missing``: a copy of the package's Python files without any ``_C*.so`` (never built).
* ``noops``: a ``midus_ops._C`` that loads but registers no op (a foreign build).
* ``stale``: a ``midus_ops._C`` that registers ``pk_topk`` and an older ``hive_gather`` schema
  (no ``check_indices``), and no backward ops (a build of an older midus_ops).
In ``noops`` and ``stale`` the child also imports ``midus`` (which crashed there before).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

BLOCK_REASON = "simulated load failure: undefined symbol _ZN3c1017midus_test_symbolEv"

# Installs the blocker (per mode), imports midus_ops while recording warnings, then checks the ops
# and layers against the reference inside the child; prints a JSON report on its last line.
CHILD = textwrap.dedent(r'''
    import importlib.abc, importlib.machinery, json, sys, warnings

    MODE, REASON = sys.argv[1], sys.argv[2]

    class _FailingLoader(importlib.abc.Loader):
        def create_module(self, spec):
            raise ImportError(REASON)
        def exec_module(self, module):
            raise ImportError(REASON)

    class _WrongOpsLoader(importlib.abc.Loader):
        """A module that loads fine but registers no op (noops) or the wrong ones (stale)."""
        def create_module(self, spec):
            return None
        def exec_module(self, module):
            module.__file__ = "/fake/midus_ops/_C.so"
            if MODE == "stale":
                import torch
                module.lib = torch.library.Library("midus_ops", "DEF")
                module.lib.define("pk_topk(Tensor q, Tensor subkeys, int k) -> (Tensor scores, Tensor indices)")
                module.lib.define("hive_gather(Tensor weights, Tensor indices, Tensor bank, Tensor? proj, "
                                  "bool deterministic) -> Tensor")

    class _Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "midus_ops._C":
                return None
            if MODE == "finder":
                raise ImportError(REASON)
            if MODE in ("noops", "stale"):
                return importlib.machinery.ModuleSpec(name, _WrongOpsLoader())
            return importlib.machinery.ModuleSpec(name, _FailingLoader())

    if MODE in ("loader", "finder", "noops", "stale"):
        sys.meta_path.insert(0, _Blocker())
    if MODE in ("missing", "shadowed"):
        # An editable install of midus elsewhere (setuptools' finder) would supply ITS midus_ops._C
        # to this copy, which has none: this case is about a copy without any.
        sys.meta_path[:] = [f for f in sys.meta_path if not str(getattr(f, "__module__", "")).startswith("__editable__")]
    # Built midus_ops folders on the path other than the copy under test: a non-editable install
    # in site-packages makes "missing" the "shadowed" case, which says so instead of "not built".
    import glob, os
    BUILT_ELSEWHERE = [p for p in sys.path if glob.glob(os.path.join(p or ".", "midus_ops", "_C*"))
                       and not os.path.abspath(p or ".").startswith(os.path.abspath("pkg"))]

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")   # a second warning would be recorded, not deduplicated
        import midus_ops
        import midus_ops.ops, midus_ops.layers, midus_ops.reference
        import midus_ops as again          # importing again must not warn again
        if MODE in ("noops", "stale"):
            import midus                   # imports midus_ops' layers and registers the model
    ext_warnings = [str(w.message) for w in rec if issubclass(w.category, midus_ops.MidusExtensionWarning)]
    other_warnings = [f"{w.category.__name__}: {w.message}" for w in rec
                      if not issubclass(w.category, midus_ops.MidusExtensionWarning)]

    import torch
    from midus_ops import reference as ref
    torch.manual_seed(0)

    # --- the ops equal the reference (the fallback *is* the reference: bitwise equal; in the
    # control run with the extension loaded, the kernels agree to fp32 rounding) ---
    EXACT = not midus_ops.EXTENSION_AVAILABLE

    def same(a, b):
        return torch.equal(a, b) if EXACT else torch.allclose(a, b, rtol=1e-5, atol=1e-5)

    q = torch.randn(6, 3, 8, requires_grad=True)
    sk = torch.randn(3, 2, 7, 4, requires_grad=True)
    scores, idx = midus_ops.pk_topk(q, sk, 4)
    r_scores, r_idx = ref.pk_topk_ref(q, sk, 4)
    assert same(scores, r_scores) and torch.equal(idx, r_idx)
    g = torch.randn_like(scores)
    gq, gk = torch.autograd.grad(scores, (q, sk), g)
    rq, rk = torch.autograd.grad(r_scores, (q, sk), g)
    assert same(gq, rq) and same(gk, rk)
    assert gk.abs().sum() > 0

    w = torch.randn(6, 3, 4, requires_grad=True)
    bank = torch.randn(49, 10, requires_grad=True)
    proj = torch.randn(3, 10, 5, requires_grad=True)
    for p, it in ((proj, torch.int64), (None, torch.int32)):
        out = midus_ops.hive_gather(w, idx.to(it), bank, p, deterministic=True)
        r_out = ref.hive_gather_ref(w, idx.to(it), bank, p)
        assert same(out, r_out)
        go = torch.randn_like(out)
        ins = [w, bank] + ([p] if p is not None else [])
        for a, b in zip(torch.autograd.grad(out, ins, go), torch.autograd.grad(r_out, ins, go)):
            assert same(a, b)
    # the input checks still run: an out-of-range index is an error naming `indices`
    bad = idx.clone(); bad[0, 0, 0] = 49
    try:
        midus_ops.hive_gather(w, bad, bank, proj)
        raise AssertionError("no error for an out-of-range index")
    except IndexError as e:
        assert "indices" in str(e), e

    # --- the layers work, and equal a direct reference computation ---
    # (tau = 0.5: the default 1 skips the division, so a lost temperature would pass unseen)
    layer = midus_ops.HeadwiseMemoryLayer(num_heads=3, head_dim=8, n=7, k=4, d_z=10, tau=0.5)
    with torch.no_grad():
        layer.bank.normal_()
    o = torch.randn(2, 5, 3, 8)
    r = layer(o)
    s, i = ref.pk_topk_ref(o.reshape(-1, 3, 8), layer.subkeys, 4)
    want = ref.hive_gather_ref(torch.softmax(s.float() / 0.5, -1), i, layer.bank, layer.proj).reshape(r.shape)
    assert torch.allclose(r, want, rtol=1e-6, atol=1e-6)
    r.square().sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    pkm = midus_ops.ProductKeyMemory(d_model=12, num_heads=2, n=5, k=3, d_k=6, tau=2.0)
    x = torch.randn(4, 12)
    y = pkm(x)
    s, i = ref.pk_topk_ref((x @ pkm.query.weight.t()).view(4, 2, 6), pkm.subkeys, 3)
    want = (torch.softmax(s.float() / 2.0, -1)[..., None] * pkm.values[i]).sum((1, 2))
    assert torch.allclose(y, want, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert y.shape == (4, 12) and pkm.values.grad is not None

    # --- spec 1.2 promises for the fallback too (reported, asserted by the parent) ---
    # deterministic=True: bitwise-identical bank gradients run to run under heavy repetition
    # (every token reads rows 5, 17, 40).
    hot = torch.tensor([5, 17, 40])[torch.randint(0, 3, (384, 3, 4))]
    hw = torch.randn(384, 3, 4, requires_grad=True)
    hb = torch.randn(48, 80, requires_grad=True)
    hp = (torch.randn(3, 80, 16) / 9).requires_grad_()
    hg = torch.randn(384, 3, 16)
    # More threads than cores interleave the scatter's threads more, so a non-deterministic
    # accumulation shows up more reliably (a deterministic one is unaffected either way).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(4, threads))
    runs = [torch.autograd.grad(midus_ops.hive_gather(hw, hot, hb, hp, deterministic=True), hb, hg)[0]
            for _ in range(20)]
    torch.set_num_threads(threads)
    det_differing = sum(not torch.equal(runs[0], r) for r in runs[1:])
    # bf16: with the bank gradient accumulated in fp32 and rounded once to bf16, the largest
    # error is about one bf16 ulp of the largest gradient (~2^-8 of max |grad|); accumulating the
    # ~1536 terms per hot row in bf16 is an order of magnitude worse (~5%).
    b16 = hb.detach().bfloat16().requires_grad_()
    out16 = midus_ops.hive_gather(hw.detach().bfloat16(), hot, b16, hp.detach().bfloat16())
    g16 = torch.autograd.grad(out16, b16, hg.bfloat16())[0].double()
    b64 = hb.detach().bfloat16().double().requires_grad_()
    exact = torch.autograd.grad(ref.hive_gather_ref(hw.detach().bfloat16().double(), hot, b64,
                                                    hp.detach().bfloat16().double()), b64, hg.bfloat16().double())[0]
    rows = [5, 17, 40]
    bf16_rel_err = ((g16 - exact).abs().max() / exact.abs().max()).item()

    print(json.dumps(dict(
        det_differing=det_differing,
        bf16_bank_grad_rel_err=bf16_rel_err,
        file=midus_ops.__file__,
        built_elsewhere=BUILT_ELSEWHERE,
        available=midus_ops.EXTENSION_AVAILABLE,
        error=midus_ops.EXTENSION_ERROR,
        has_kernel=midus_ops.has_kernel("pk_topk", torch.device("cpu")),
        ext_warnings=ext_warnings,
        other_warnings=other_warnings,
    )))
''')


_REPORTS: dict = {}


def run_child(mode: str, tmp_path) -> dict:
    """Run the child once per mode per session (each costs an interpreter start and a torch
    import, seconds on 2 cores) and return its JSON report."""
    if mode not in _REPORTS:
        _REPORTS[mode] = _run_child(mode, tmp_path)
    return _REPORTS[mode]


def _run_child(mode: str, tmp_path) -> dict:
    env = dict(os.environ)
    env.pop("MIDUS_OPS_DISABLE_EXTENSION", None)
    if mode == "env":
        env["MIDUS_OPS_DISABLE_EXTENSION"] = "1"
    if mode in ("missing", "shadowed"):
        import midus_ops
        src = os.path.dirname(midus_ops.__file__)
        shutil.copytree(src, tmp_path / "pkg" / "midus_ops", ignore=shutil.ignore_patterns("_C*", "__pycache__"))
        paths = [str(tmp_path / "pkg")]
        if mode == "shadowed":  # an "installed" midus_ops with a built extension, later on the path
            (tmp_path / "site" / "midus_ops").mkdir(parents=True)
            (tmp_path / "site" / "midus_ops" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
            paths.append(str(tmp_path / "site"))
        env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, BLOCK_REASON], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (f"child ({mode}) failed, rc={proc.returncode}\n--- stdout\n{proc.stdout}"
                                  f"\n--- stderr\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["loader", "finder", "env", "missing", "shadowed", "noops", "stale"])
def test_fallback_when_extension_unavailable(mode, tmp_path):
    report = run_child(mode, tmp_path)
    assert report["available"] is False
    assert report["has_kernel"] is False
    assert len(report["ext_warnings"]) == 1, f"expected exactly one MidusExtensionWarning: {report['ext_warnings']}"
    message = report["ext_warnings"][0]
    reason = {"env": "MIDUS_OPS_DISABLE_EXTENSION",
              "missing": "hides the installed midus_ops" if report.get("built_elsewhere") else "not built",
              "shadowed": f"which hides the installed midus_ops with its extension at {tmp_path / 'site' / 'midus_ops'}: "
                          f"run Python from another directory",
              "noops": "/fake/midus_ops/_C.so loaded but does not register the ops of this midus_ops (a stale or "
                       "foreign build): no midus_ops::pk_topk; no midus_ops::pk_topk_backward; no "
                       "midus_ops::hive_gather; no midus_ops::hive_gather_backward",
              "stale": "no midus_ops::pk_topk_backward; midus_ops::hive_gather(weights, indices, bank, proj, "
                       "deterministic) where (weights, indices, bank, proj, deterministic, check_indices) is "
                       "expected; no midus_ops::hive_gather_backward"}.get(mode, BLOCK_REASON)
    assert reason in message, f"the warning does not name the reason {reason!r}: {message!r}"
    assert reason in report["error"], report["error"]
    if mode in ("missing", "shadowed"):
        assert report["file"].startswith(str(tmp_path)), report["file"]
        # Rebuilding does not help when an installed build is hidden: the warning does not say to.
        assert ("Rebuild" in message) is (mode == "missing" and not report["built_elsewhere"])


_COMPILED_BAD_INDEX = textwrap.dedent(r"""
    import json, sys, warnings
    warnings.simplefilter("ignore")
    import torch
    import midus_ops
    assert not midus_ops.EXTENSION_AVAILABLE
    out = {}
    for dynamic in (False, True):
        f = torch.compile(lambda w, i, b: midus_ops.hive_gather(w, i, b), dynamic=dynamic, fullgraph=True)
        w, bank = torch.randn(3, 2, 4), torch.randn(16, 8)
        good = torch.randint(0, 16, (3, 2, 4))
        torch.testing.assert_close(f(w, good, bank), midus_ops.reference.hive_gather_ref(w, good, bank))
        for bad in (16, -1):
            i = good.clone()
            i[1, 0, 2] = bad
            try:
                f(w, i, bank)
                out[f"{dynamic},{bad}"] = "no error"
            except Exception as err:
                out[f"{dynamic},{bad}"] = f"{type(err).__name__}: {err}"
    print(json.dumps(out))
""")


def test_fallback_out_of_range_index_inside_torch_compile_names_indices(tmp_path):
    """The reference's range check is a host-side min/max, which cannot run while tracing: inside
    torch.compile (fullgraph, static and dynamic shapes) a bad index must still fail with a message
    naming ``indices``, not Inductor's "index out of bounds" on a temporary."""
    env = dict(os.environ, MIDUS_OPS_DISABLE_EXTENSION="1")
    proc = subprocess.run([sys.executable, "-c", _COMPILED_BAD_INDEX], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report) == {"False,16", "False,-1", "True,16", "True,-1"}
    for case, message in report.items():
        assert "hive_gather: indices out of range" in message, (case, message)


def test_extension_loads_in_a_clean_process(tmp_path):
    """Control for the tests above: without a blocker the same child script must not warn, and it
    loads the extension when this process did (so the 'fallback' above really was one)."""
    import midus_ops

    report = run_child("none", tmp_path)
    assert report["available"] is midus_ops.EXTENSION_AVAILABLE
    if midus_ops.EXTENSION_AVAILABLE:
        assert report["ext_warnings"] == [] and report["error"] is None and report["has_kernel"] is True
        # the compiled kernels keep the promises checked for the fallback above
        assert report["det_differing"] == 0
        assert report["bf16_bank_grad_rel_err"] <= 2.0 ** -6


def test_fallback_deterministic_flag(tmp_path):
    """Spec 1.2: ``deterministic=True`` gives bitwise-identical results run to run, with the
    fallback too (the reference's ``bank[indices]`` backward is an index_put_ accumulate, which
    is not deterministic on its own, on CPU or CUDA)."""
    report = run_child("env", tmp_path)
    assert report["det_differing"] == 0, \
        f"{report['det_differing']} of 19 backward runs gave a different bank gradient with deterministic=True"


def test_fallback_bf16_bank_grad_accumulates_in_fp32(tmp_path):
    """Spec 1.1/1.2: accumulate in fp32 whatever the input dtype. Under heavy repetition (~1536
    contributions per hot row) a bank gradient accumulated in bf16 is off by several percent;
    one accumulated in fp32 is within ~1 bf16 ulp: max |error| / max |grad| <= 2^-6 leaves 4x
    room (the compiled kernel measures ~0.002, a bf16 accumulation ~0.05)."""
    report = run_child("env", tmp_path)
    assert report["bf16_bank_grad_rel_err"] <= 2.0 ** -6, \
        f"bf16 bank gradient off by {report['bf16_bank_grad_rel_err']:.3g} of its max: accumulated in bf16?"


# Without the extension, the tests of the compiled kernels must fail, saying why, unless
# MIDUS_TEST_ALLOW_FALLBACK=1 says the fallback is what is being tested (tests/op_testing.py).
KERNEL_TESTS = ["tests/test_ops.py::test_extension_registers_cpu_kernels",      # of the compiled ops
                "tests/test_ops.py::test_tie_rule_public_op_hand_made[stage2-fp32-cpu]",  # kernel vs reference
                "tests/test_pk_select.py::test_nan_scores_do_not_crash_and_rank_first"]


def _pytest_child(tmp_path, **env_vars):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MIDUS_OPS_DISABLE_EXTENSION="1", **env_vars)
    if "MIDUS_TEST_ALLOW_FALLBACK" not in env_vars:
        env.pop("MIDUS_TEST_ALLOW_FALLBACK", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *KERNEL_TESTS],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_kernel_tests_fail_without_the_extension(tmp_path):
    proc = _pytest_child(tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "3 error" in out and "passed" not in out and "skipped" not in out, out[-3000:]
    assert "MIDUS_TEST_ALLOW_FALLBACK=1" in out and "disabled by MIDUS_OPS_DISABLE_EXTENSION" in out, out[-3000:]


def test_kernel_tests_with_the_fallback_allowed(tmp_path):
    proc = _pytest_child(tmp_path, MIDUS_TEST_ALLOW_FALLBACK="1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "1 passed, 2 skipped" in out, out[-3000:]  # the public op runs on the reference
