"""Options owned in one place (midus_ops.MemoryOptions, midus.lesa.LesaOptions), retrieval hooks
instead of patched forwards, and the registry of operator implementations (issue 14, items 3-4)."""
import dataclasses
import inspect
import re
import warnings

import numpy as np
import pytest
import torch

warnings.filterwarnings("ignore", message=".*midus_ops.*")

import midus  # noqa: E402
import midus_ops  # noqa: E402
from midus_ops import HeadwiseMemoryLayer, MemoryOptions, ProductKeyMemory  # noqa: E402
from midus_ops.layers import MEMORY_OPS, register_memory_ops, set_memory_ops, use_memory_ops  # noqa: E402
from midus.lesa import LESA_DEFAULTS, LesaOptions  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(n=8, k=4, d_z=16, pkm_heads=2, pkm_d_k=16)


def _base(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64)).eval()


# ----------------------------------------------------------------------------- MemoryOptions


def test_memory_options_defaults_are_the_single_source():
    opts = MemoryOptions()
    assert midus.MEMORY_DEFAULTS == opts.to_dict()
    # the layers' signature defaults are MemoryOptions's
    hml = inspect.signature(HeadwiseMemoryLayer).parameters
    for name in ("n", "k", "d_z", "tau", "query_norm", "learn_tau", "deterministic"):
        assert hml[name].default == getattr(opts, name), name
    pkm = inspect.signature(ProductKeyMemory).parameters
    for name, field in (("num_heads", "pkm_heads"), ("n", "n"), ("k", "k"), ("d_k", "pkm_d_k"), ("tau", "tau"),
                        ("learn_tau", "learn_tau"), ("deterministic", "deterministic")):
        assert pkm[name].default == getattr(opts, field), name
    cfg = inspect.signature(midus.MidusConfig).parameters
    for name in MemoryOptions.fields():
        assert cfg[name].default == getattr(opts, name), name


@pytest.mark.parametrize("field,value,match", [
    ("k", 40, r"k must satisfy 1 <= k <= n = 32, got k = 40"),
    ("n", 0, r"n must be a positive int, got 0"),
    ("d_z", 2.5, r"d_z must be a positive int"),
    ("tau", float("inf"), r"tau must be a positive finite number"),
    ("tau", "x", r"tau must be a positive number"),
    ("memory", "ffn", r"memory must be 'hml' or 'pkm'"),
    ("query_norm", "layer", r"query_norm must be 'none' or 'rms'"),
    ("learn_tau", 1, r"learn_tau must be True or False"),
    ("deterministic", "yes", r"deterministic must be True or False"),
    ("pkm_heads", True, r"pkm_heads must be a positive int"),
])
def test_memory_options_validate_naming_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        MemoryOptions(**{field: value})


def test_memory_options_normalise_frozen_and_unknown_fields():
    opts = MemoryOptions(k=np.int64(8), n=np.int32(16), tau=2)
    assert type(opts.k) is int and type(opts.n) is int and opts.tau == 2.0 and type(opts.tau) is float
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.k = 4
    with pytest.raises(TypeError, match=r"unknown memory option\(s\) \['kk'\]"):
        MemoryOptions.from_dict({"kk": 3})
    assert opts.replace(k=2).k == 2 and opts.k == 8
    with pytest.raises(ValueError, match="out_proj='copy' applies to memory='hml' only"):
        MemoryOptions(memory="pkm", out_proj="copy")
    assert MemoryOptions.from_dict(opts.to_dict()) == opts


def test_layers_from_options_equal_the_keyword_construction():
    opts = MemoryOptions(n=6, k=3, d_z=12, tau=0.5, query_norm="rms", learn_tau=True, deterministic=True,
                         pkm_heads=2, pkm_d_k=8)
    torch.manual_seed(0)
    a = HeadwiseMemoryLayer.from_options(2, 8, opts)
    torch.manual_seed(0)
    b = HeadwiseMemoryLayer(2, 8, n=6, k=3, d_z=12, tau=0.5, query_norm="rms", learn_tau=True, deterministic=True)
    assert a.deterministic and repr(a) == repr(b)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    with pytest.raises(ValueError, match=r"options.memory is 'hml', which is not this layer"):
        ProductKeyMemory.from_options(16, opts)
    with pytest.raises(ValueError, match=r"options.memory is 'pkm'"):
        HeadwiseMemoryLayer.from_options(2, 8, opts.replace(memory="pkm"))
    p = ProductKeyMemory.from_options(16, opts.replace(memory="pkm"), value_init="zeros")
    assert (p.num_heads, p.n, p.k, p.d_k, p.tau, p.deterministic) == (2, 6, 3, 8, 0.5, True)
    assert p.log_tau is not None and not p.values.any()
    with pytest.raises(TypeError, match="options must be a midus_ops.MemoryOptions"):
        HeadwiseMemoryLayer.from_options(2, 8, {"k": 3})


def test_deterministic_reaches_the_layers_the_config_and_a_saved_folder(tmp_path):
    big = midus.upscale(_base(), "midus", 2, **SMALL, deterministic=True)
    assert big.config.deterministic is True
    assert big.config.midus_upscale["memory_options"]["deterministic"] is True
    mems = [m for m in big.modules() if isinstance(m, HeadwiseMemoryLayer)]
    assert len(mems) == 2 and all(m.deterministic for m in mems)
    big.save_pretrained(tmp_path)
    loaded = type(big).from_pretrained(tmp_path)
    assert loaded.config.get_memory_options() == big.config.get_memory_options()
    assert all(m.deterministic for m in loaded.modules() if isinstance(m, HeadwiseMemoryLayer))


def test_upscale_takes_an_options_object_and_the_old_keywords_alike():
    base = _base()
    opts = MemoryOptions(**SMALL, out_proj="copy", tau=0.5)
    torch.manual_seed(1)
    a = midus.upscale(base, "midus", 2, memory=opts)
    torch.manual_seed(1)
    b = midus.upscale(base, "midus", 2, **SMALL, out_proj="copy", tau=0.5)
    assert a.config.to_dict() == b.config.to_dict()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # the kind as a string, as before; keywords override the object's fields
    p = midus.upscale(base, "midus", 1, memory="pkm", **SMALL)
    assert p.config.memory == "pkm"
    c = midus.upscale(base, "midus", 1, memory=opts, k=2)
    assert c.config.k == 2 and c.config.tau == 0.5
    with pytest.raises(TypeError, match="applies to method='midus' only"):
        midus.upscale(base, "dus", 1, memory=opts)
    with pytest.raises(TypeError, match=r"memory must be a midus_ops.MemoryOptions, a memory kind"):
        midus.upscale(base, "midus", 1, memory={"n": 4})
    with pytest.raises(ValueError, match="k must satisfy"):
        midus.upscale(base, "midus", 1, memory=opts, k=99)


def test_lesa_options_object_and_keywords_alike():
    assert LESA_DEFAULTS == LesaOptions().to_dict()
    assert LesaOptions().replace(rank=None).rank is None and "rank" in LesaOptions.fields()
    with pytest.raises(ValueError, match="norm_weight must be in"):
        LesaOptions(norm_weight=2.0)
    with pytest.raises(TypeError, match=r"unknown lesa option\(s\) \['ranks'\]"):
        LesaOptions.from_dict({"ranks": 3})
    base = _base()
    a = midus.upscale(base, "lesa", 1, lesa=LesaOptions(rank=4, hidden=16, epochs=1))
    b = midus.upscale(base, "lesa", 1, rank=4, hidden=16, epochs=1)
    assert a.config.midus_upscale["lesa_options"] == b.config.midus_upscale["lesa_options"]
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(TypeError, match="lesa options apply to method='lesa' only"):
        midus.upscale(base, "dus", 1, lesa=LesaOptions())


def test_cli_memory_flags_state_the_options_defaults():
    """The help texts write the defaults out (--help imports nothing heavy); they must be MemoryOptions's."""
    from midus.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices["upscale"]
    flags = {a.dest: a for a in sub._actions}
    opts = MemoryOptions()
    for field in MemoryOptions.fields():
        action = flags[field]
        assert action.default is None, field  # not given: upscale fills the default
        m = re.search(r"\(default: ([^)]*)\)", action.help)
        assert m, (field, action.help)
        shown = m.group(1)
        want = getattr(opts, field)
        if isinstance(want, bool):
            assert shown in (str(want), "fixed tau") or (field == "learn_tau" and shown == "fixed tau"), (field, shown)
        else:
            assert shown == str(want), (field, shown, want)
    args = parser.parse_args(["upscale", "--model", "x", "--output", "y", "--deterministic", "--k", "8"])
    from midus.cli import _memory_options

    assert _memory_options(args) == {"k": 8, "deterministic": True}


# ----------------------------------------------------------------------------- retrieval hooks


def _hml(seed=0, **kw):
    torch.manual_seed(seed)
    m = HeadwiseMemoryLayer(3, 8, n=6, k=3, d_z=10, **kw)
    torch.nn.init.normal_(m.bank)
    return m.eval()


def test_a_looking_hook_leaves_the_output_bit_for_bit_and_sees_the_retrieval():
    m = _hml()
    x = torch.randn(2, 5, 3, 8)
    y = m(x)
    seen = []
    handle = m.register_retrieval_hook(lambda layer, q, s, i, w: seen.append((layer, q.shape, s.shape, i, w)))
    assert torch.equal(m(x), y)
    layer, qs, ss, idx, w = seen[0]
    assert layer is m and qs == (10, 3, 8) and ss == (10, 3, 3) and idx.shape == (10, 3, 3)
    assert w.dtype == torch.float32 and torch.allclose(w.sum(-1), torch.ones(10, 3))
    handle.remove()
    m(x)
    assert len(seen) == 1


def test_a_replacing_hook_changes_the_read_out_and_bad_indices_are_refused():
    m = _hml()
    x = torch.randn(7, 3, 8)
    zero_head = m.register_retrieval_hook(lambda layer, q, s, i, w: (i, w * torch.tensor([0.0, 1, 1]).view(1, 3, 1)))
    out = m(x)
    assert not out[:, 0].any() and out[:, 1:].abs().sum() > 0
    zero_head.remove()
    with torch.no_grad():
        ref = m(x)
    assert torch.equal(out[:, 1:], ref[:, 1:])
    m.register_retrieval_hook(lambda layer, q, s, i, w: (torch.full_like(i, 36), w))  # n*n = 36: out of range
    with pytest.raises(IndexError, match="indices"):
        m(x)


def test_hooks_chain_in_order_and_statistics_record_after_them():
    m = _hml()
    m.reset_memory_stats()
    order = []

    def first(layer, q, s, i, w):
        order.append("first")
        return torch.zeros_like(i), w  # every token reads slot 0

    def second(layer, q, s, i, w):
        order.append("second")
        assert not i.any()  # sees the first one's result
    m.register_retrieval_hook(first)
    m.register_retrieval_hook(second)
    m(torch.randn(4, 3, 8))
    assert order == ["first", "second"]
    assert torch.equal(m.stats.slot_counts[:, 1:], torch.zeros_like(m.stats.slot_counts[:, 1:]))
    with pytest.raises(TypeError, match="hook must be callable"):
        m.register_retrieval_hook(3)


def test_a_hook_may_remove_itself_or_add_another():
    m = _hml()
    x = torch.randn(4, 3, 8)
    calls = []
    handles = {}

    def once(layer, q, s, i, w):
        calls.append("once")
        handles["once"].remove()
        layer.register_retrieval_hook(lambda *a: calls.append("added"))

    handles["once"] = m.register_retrieval_hook(once)
    m.register_retrieval_hook(lambda *a: calls.append("other"))
    m(x)
    m(x)
    assert calls == ["once", "other", "other", "added"]


def test_an_unregistered_ops_implementation_is_named():
    m = _hml()
    m.ops_implementation = "gone"  # e.g. unpickled where it is not registered
    with pytest.raises(ValueError, match=r"ops_implementation must be one of .*got 'gone'"):
        m(torch.randn(2, 3, 8))


def test_pkm_hooks_and_the_analysis_path_reproduce_the_layer():
    from midus.analyze import memory_forward, override_memory

    torch.manual_seed(0)
    p = ProductKeyMemory(16, num_heads=2, n=6, k=3, d_k=8).eval()
    x = torch.randn(9, 16)
    y = p(x)
    records = []
    assert torch.equal(memory_forward(p, x, record=lambda i, w: records.append(i)), y)
    assert records and records[0].shape == (9, 2, 3)
    before = p.stats.tokens.clone()
    with override_memory({p: lambda q, s, i, w: (i, torch.zeros_like(w))}):
        assert not p(x).any()
        assert p.track_stats is False
    assert p.track_stats is True and torch.equal(p.stats.tokens, before)
    assert not p._retrieval_hooks


# ----------------------------------------------------------------------------- operator registry


def test_registered_ops_are_chosen_per_layer_and_restored():
    calls = []

    def topk(q, subkeys, k):
        calls.append("topk")
        return midus_ops.pk_topk(q, subkeys, k)

    def gather(w, i, bank, proj=None, deterministic=False, check_indices=True):
        calls.append("gather")
        return midus_ops.hive_gather(w, i, bank, proj, deterministic=deterministic, check_indices=check_indices)

    register_memory_ops("counting", topk, gather)
    try:
        a, b = _hml(0), _hml(0)
        x = torch.randn(4, 3, 8)
        box = torch.nn.ModuleList([a])
        with use_memory_ops(box, "counting"):
            ya = a(x)
            yb = b(x)  # not in the module: its own ops
        assert calls == ["topk", "gather"] and torch.equal(ya, yb)
        assert a.ops_implementation == "midus_ops"
        prev = set_memory_ops(box, "counting")
        assert prev == {a: "midus_ops"} and "ops_implementation='counting'" in repr(a)
        with pytest.raises(ValueError, match="ops_implementation must be one of"):
            set_memory_ops(box, "nope")
        with pytest.raises(ValueError, match="ops_implementation must be one of"):
            HeadwiseMemoryLayer(2, 8, n=4, k=2, ops_implementation="nope")
        with pytest.raises(ValueError, match="cannot be replaced"):
            register_memory_ops("midus_ops", topk, gather)
    finally:
        MEMORY_OPS.pop("counting", None)


def test_no_module_patches_another_modules_names():
    """Interventions go through hooks and the registry: no `module.forward = ...` on instances and
    no assignment to another module's attributes (e.g. `midus_ops.layers.pk_topk = ...`)."""
    import pathlib

    root = pathlib.Path(midus.__file__).parent
    pattern = re.compile(r"^\s*[\w.]*\.(forward|pk_topk|hive_gather)\s*=[^=]", re.M)
    hits = [f"{p.relative_to(root)}: {m.group(0).strip()}" for p in root.rglob("*.py")
            for m in pattern.finditer(p.read_text())]
    assert not hits, hits


def test_each_environment_variable_has_one_reader():
    """docs/environment.md: every variable the package reads is read in one module."""
    import pathlib

    readers = {}
    for root in (pathlib.Path(midus.__file__).parent, pathlib.Path(midus_ops.__file__).parent):
        for p in root.rglob("*.py"):
            text = p.read_text()
            names = set(re.findall(r"os\.(?:environ(?:\.get)?|getenv)[\[(]\s*\"([A-Z_]+)\"", text))
            names |= set(re.findall(r"\"([A-Z_]+)\"\s+(?:not\s+)?in\s+os\.environ", text))
            for name in names:
                readers.setdefault(name, set()).add(p.name if p.parent == root else f"{p.parent.name}/{p.name}")
    assert readers.get("MIDUS_DEBUG") == {"runtime.py"}, readers
    shared = {name: files for name, files in readers.items() if len(files) > 1}
    assert not shared, shared
