"""Depth up-scaling of a Hugging Face causal LM: MIDUS, DUS, LLaMA Pro, SOLAR, LESA, Avg-DeUS, OpT-DeUS
(docs/design.md §3.2, §3.3; :mod:`midus.deus`), with fixed or importance-guided placement (:mod:`midus.placement`).

``upscale`` never modifies its input: it builds a new model from an updated config (every layer
with its own ``layer_idx``, hence its own KV-cache slot) and copies the base weights into it, so
nothing is shared with the base model.
"""
from __future__ import annotations

import copy
import re
from typing import Any, Dict, List, Optional, Sequence, Set, Union

import torch
from transformers import PreTrainedModel

from midus_ops import HeadwiseMemoryLayer, MemoryOptions, ProductKeyMemory

from .constants import DEFAULT_PLACEMENT, KEY_VALUE_PARAMETER_NAMES, METHODS, PLACEMENTS
from .deus import DEUS_METHODS, check_deus_options
from .lesa import LesaOptions, check_lesa_options, predict_layers
from .modeling_midus import MidusConfig, MidusForCausalLM, _check_memory_options, family_classes

__all__ = ["upscale", "placement_indices", "solar_layer_order", "new_parameter_names", "memory_parameter_names",
           "residual_writers", "METHODS", "PLACEMENTS", "DEFAULT_PLACEMENT", "KEY_VALUE_PARAMETER_NAMES"]

# LLaMA Pro (and Avg-/OpT-DeUS) zero-initialise the modules that write into the residual stream,
# found by role: the output projections, whose weight (and bias) are set to 0 ...
_RESIDUAL_WRITERS = {"attention output": "self_attn.o_proj", "mlp output": "mlp.down_proj"}
# ... except where a norm sits between them and the residual stream. Gemma 3 normalises each
# branch (post_attention_layernorm, post_feedforward_layernorm): RMSNorm(0) = 0 keeps the layer
# the identity, but its gradient at 0 is 1/sqrt(eps), and the first AdamW step then adds a
# full-size branch (Gemma 3 270M, LLaMA Pro K=4, one step at LR 1e-5: KL to the base 12 nats).
# There the norms' gain is zeroed instead (Gemma's norm multiplies by 1 + weight: weight = -1),
# which keeps the identity and grows smoothly (same step at LR 1e-4: KL 1.3e-7). Value: the
# weight that gives gain 0.
_NORM_WRITERS = {"gemma3_text": ({"attention output": "post_attention_layernorm",
                                  "mlp output": "post_feedforward_layernorm"}, -1.0)}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.*)$")

Placement = Union[str, Sequence[int]]


def _check_int(name: str, value) -> int:
    """``value`` as a Python int (numpy and other integer types accepted); TypeError naming
    ``name`` for bools, floats and the rest."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


def placement_indices(num_layers: int, num_blocks: Optional[int], placement: Placement = "distributed") -> List[int]:
    """Base-layer indices i_0 < ... < i_{K-1}; new block j follows base layer i_j (docs/design.md §3.2).

    - "distributed" (default): i_j = floor((j+1) * L / K) - 1   (L=16, K=8: 1, 3, ..., 15)
    - "top-heavy": i_j = L - K + j;  "bottom-heavy": i_j = j
    - "top-gaps": i_j = L - 1 - K + j, the K gaps between consecutive layers nearest the top
      (never after the last layer; K <= L - 1; OpT-DeUS's default, arXiv 2508.08011)
    - a list of layer indices (any order; returned sorted); ``num_blocks`` may then be None.
    - "importance" is measured on calibration text by :func:`upscale` (:mod:`midus.placement`),
      not computable here.

    Args: num_layers L >= 1, num_blocks K with 1 <= K <= L.
    Raises ValueError naming the argument: K out of range, unknown placement, explicit indices out of
    [0, L), repeated, or a list whose length differs from num_blocks; TypeError for non-int values.
    """
    L = _check_int("num_layers", num_layers)
    if L < 1:
        raise ValueError(f"num_layers must be >= 1, got {L}")
    if isinstance(placement, str):
        if num_blocks is None:
            raise ValueError(f"num_blocks is required with placement={placement!r}")
        K = _check_int("num_blocks", num_blocks)
        if not 1 <= K <= L:
            raise ValueError(f"num_blocks must satisfy 1 <= num_blocks <= num_layers = {L}, got {K}")
        if placement == "distributed":
            return [(j + 1) * L // K - 1 for j in range(K)]
        if placement == "top-heavy":
            return [L - K + j for j in range(K)]
        if placement == "bottom-heavy":
            return list(range(K))
        if placement == "top-gaps":
            if K > L - 1:
                raise ValueError(f"num_blocks must satisfy 1 <= num_blocks <= num_layers - 1 = {L - 1} with "
                                 f"placement='top-gaps' (one new layer per gap between consecutive layers), got {K}")
            return [L - 1 - K + j for j in range(K)]
        if placement == "importance":
            raise ValueError("placement='importance' is measured on calibration text: call "
                             "midus.upscale(model, method, K, placement='importance', calibration=token_ids)")
        raise ValueError(f"unknown placement {placement!r}; expected one of {', '.join(PLACEMENTS)} "
                         f"or a list of layer indices")
    if not isinstance(placement, (list, tuple)):
        raise TypeError(f"placement must be one of {', '.join(PLACEMENTS)} or a list of layer indices, "
                        f"got {placement!r}")
    idx = [_check_int("placement index", i) for i in placement]
    if not idx:
        raise ValueError("placement is an empty list; give at least one layer index")
    bad = [i for i in idx if not 0 <= i < L]
    if bad:
        raise ValueError(f"placement indices {bad} out of range [0, {L}) (the base model has {L} layers)")
    if len(set(idx)) != len(idx):
        dup = sorted({i for i in idx if idx.count(i) > 1})
        raise ValueError(f"placement indices repeated: {dup}; each base layer takes at most one new block")
    if num_blocks is not None and _check_int("num_blocks", num_blocks) != len(idx):
        raise ValueError(f"num_blocks={num_blocks} but placement lists {len(idx)} layer indices")
    return sorted(idx)


def solar_layer_order(num_layers: int, num_blocks: int) -> List[int]:
    """SOLAR stack (docs/design.md §3.3): layers 0..L-m-1 then m..L-1, m = (L - K) / 2; L + K layers in all.

    L=16, K=8: 0..11 then 4..15. Raises ValueError naming num_blocks if K is out of [1, L] or
    L - K is odd.
    """
    L, K = _check_int("num_layers", num_layers), _check_int("num_blocks", num_blocks)
    if not 1 <= K <= L:
        raise ValueError(f"num_blocks must satisfy 1 <= num_blocks <= num_layers = {L}, got {K}")
    if (L - K) % 2:
        raise ValueError(f"method='solar' needs num_layers - num_blocks even (m = (L - K) / 2 layers are dropped "
                         f"from each copy), got L={L}, num_blocks={K}")
    m = (L - K) // 2
    return list(range(L - m)) + list(range(m, L))


def _family_of(model) -> str:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    model_type = getattr(model.config, "model_type", None)
    fam = family_classes(model_type)  # ValueError listing the supported families
    if not isinstance(model, fam.ForCausalLM):
        raise TypeError(f"model must be a {fam.ForCausalLM.__name__} (a causal LM with model.layers), "
                        f"got {type(model).__name__}")
    return model_type


def _remap_layer_fields(config, sources: List[int]) -> None:
    """Update the fields that count or list layers; ``sources[p]`` is the base layer of new position p."""
    configs = [config]
    nested = getattr(config, "text_config", None)
    if nested is not None and nested is not config:
        configs.append(nested)
    for cfg in configs:
        if getattr(cfg, "is_heterogeneous", False):  # transformers >= 5.2x per-layer overrides
            raise ValueError("model.config has per-layer overrides (per_layer_config); up-scaling such "
                             "heterogeneous configs is not supported")
        cfg.num_hidden_layers = len(sources)
        layer_types = getattr(cfg, "layer_types", None)
        if layer_types is not None:
            cfg.layer_types = [layer_types[s] for s in sources]
        mwl = getattr(cfg, "max_window_layers", None)
        if mwl is not None:  # Qwen2/3: layers below it use full attention; keep the same ones full
            cfg.max_window_layers = sum(1 for s in sources if s < mwl)


def _build(cls, config, reference: torch.Tensor):
    """``cls(config)`` with the base model's dtype and device, without random init: built on the
    meta device, then allocated empty; every tensor is then copied from the base or freshly
    initialised (the memory) by ``_copy_weights``."""
    old = torch.get_default_dtype()
    if reference.dtype.is_floating_point:
        torch.set_default_dtype(reference.dtype)
    try:
        with torch.device("meta"):
            model = cls(config)
    finally:
        torch.set_default_dtype(old)
    model = model.to_empty(device=reference.device)
    model.tie_weights()  # to_empty gives every module its own new tensor: re-tie lm_head / embeddings
    return model


def _source_key(key: str, sources: List[int], fresh: Set[int], renames: Dict[str, str]) -> Optional[str]:
    """Base-model name of new-model tensor ``key``; None for the fresh memory of a new block."""
    m = _LAYER_KEY.match(key)
    if m is None:
        return key
    p, rest = int(m.group(1)), m.group(2)
    if p in fresh:
        if rest.startswith("memory."):
            return None
        for old, new in renames.items():
            if rest.startswith(old):
                rest = new + rest[len(old):]
    return f"model.layers.{sources[p]}.{rest}"


@torch.no_grad()
def _copy_weights(new_model, base_model, sources: List[int], fresh: Set[int], renames: Dict[str, str]) -> None:
    """Copy (never alias) base tensors into ``new_model``: ``model.layers.p.rest`` takes base
    ``model.layers.{sources[p]}.{rest}`` (with ``renames`` applied inside the positions in
    ``fresh``, whose ``memory.*`` keep their fresh init). Buffers, persistent or not (RoPE
    ``inv_freq``), are cloned too, with the base's dtype, so the copy computes exactly as the base."""
    base_sd = base_model.state_dict()
    to_load, expected_missing = {}, set()
    for key in new_model.state_dict():
        src = _source_key(key, sources, fresh, renames)
        if src is None:
            expected_missing.add(key)
        elif src not in base_sd:
            raise RuntimeError(f"internal error: no base weight {src!r} for {key!r}")
        else:
            to_load[key] = base_sd[src]
    missing, unexpected = new_model.load_state_dict(to_load, strict=False)
    if set(missing) != expected_missing or unexpected:
        raise RuntimeError(f"internal error copying weights: missing {sorted(set(missing) - expected_missing)}, "
                           f"unexpected {unexpected}")
    base_buffers = dict(base_model.named_buffers())
    for key, _ in list(new_model.named_buffers()):
        src = _source_key(key, sources, fresh, renames)
        if src is None:
            continue
        if src not in base_buffers:
            raise RuntimeError(f"internal error: no base buffer {src!r} for {key!r}")
        owner, _, leaf = key.rpartition(".")
        new_model.get_submodule(owner)._buffers[leaf] = base_buffers[src].clone()
    for p in fresh:  # the memory: the layer's own init (bank / values = 0), empty usage statistics
        memory = new_model.model.layers[p].memory
        memory.reset_parameters()
        memory.reset_memory_stats()


@torch.no_grad()
def _zero_(module) -> None:
    module.weight.zero_()
    if getattr(module, "bias", None) is not None:
        module.bias.zero_()


def residual_writers(model_type: str):
    """({role: module path inside a decoder layer}, zero): what LLaMA Pro / Avg-DeUS / OpT-DeUS
    zero so a new layer is the identity. ``zero`` None: the modules' weight and bias are set to 0;
    a number: the module is a norm on the branch and its weight is set to that value (gain 0)."""
    if model_type in _NORM_WRITERS:
        return _NORM_WRITERS[model_type]
    return _RESIDUAL_WRITERS, None


@torch.no_grad()
def _zero_writers(new, model_type: str, positions: List[int], method: str) -> None:
    writers, zero = residual_writers(model_type)
    for p in positions:
        layer = new.model.layers[p]
        for role, path in writers.items():
            try:
                module = layer.get_submodule(path)
            except AttributeError as err:
                raise ValueError(f"{method}: cannot find the {role} ({path}) in {type(layer).__name__}") from err
            if zero is None:
                _zero_(module)
            else:
                module.weight.fill_(zero)


def _layer_plan(method: str, L: int, num_blocks: Optional[int], placement: Placement):
    """(sources, inserted, base_layers): the base layer of each new position, the positions of the
    new blocks in the new stack, and the base layers they follow (solar: that appear twice)."""
    if method == "solar":
        if not (isinstance(placement, str) and placement == "distributed"):
            raise ValueError(f"placement does not apply to method='solar' (its layer order is fixed), got {placement!r}")
        if num_blocks is None:
            raise ValueError("num_blocks is required for method='solar'")
        sources = solar_layer_order(L, num_blocks)
        m = (L - num_blocks) // 2
        return sources, list(range(L - m, L - m + num_blocks)), list(range(m, L - m))
    base_layers = placement_indices(L, num_blocks, placement)
    after = set(base_layers)
    sources, inserted = [], []
    for i in range(L):
        sources.append(i)
        if i in after:
            inserted.append(len(sources))
            sources.append(i)
    return sources, inserted, base_layers


def upscale(model: PreTrainedModel, method: str, num_blocks: Optional[int] = None,
            placement: Optional[Placement] = None, *, calibration: Optional[torch.Tensor] = None,
            importance: str = "layer", memory: Union[str, MemoryOptions, None] = None,
            lesa: Optional[LesaOptions] = None, **memory_options: Any) -> PreTrainedModel:
    """Depth up-scale ``model`` by K new blocks; returns a NEW model, ``model`` is left untouched.

    MIDUS (arXiv 2512.13751) sec. 3; docs/design.md §3.1-3.3.

    Args:
        model: a causal LM of a supported family (``SUPPORTED_FAMILIES``: Llama, Mistral, Qwen2,
            Qwen3, Gemma 3 text (``Gemma3ForCausalLM``), Phi-3) with L layers (any dtype /
            device; the result has the same).
        method: "midus" (memory blocks, docs/design.md §3.1), "dus" (a full clone of layer i_j after it),
            "llama_pro" (like dus with the clone's residual writers zeroed: identity at insertion),
            "solar" (two copies of the stack, the last m layers of the first and the first m of the
            second dropped, m = (L - K) / 2), "lesa" (a layer predicted from layers i_j and i_j + 1
            by LESA's SVD + MLP, arXiv 2502.13794, inserted between them; after the last layer see
            the ``last`` option; :mod:`midus.lesa`), "avg_deus" (the mean of layers i_j and
            i_j + 1) and "opt_deus" (layer i_j + 1's heads and neurons aligned to layer i_j's by
            optimal transport, then the mean; arXiv 2508.08011), both with their residual writers
            zeroed (:mod:`midus.deus`).
        num_blocks: K, 1 <= K <= L (may be omitted when ``placement`` is a list).
        placement: "distributed", "top-heavy", "bottom-heavy", "top-gaps" (the K gaps nearest the
            top), "importance" (after the K base layers whose removal raises the loss most on
            ``calibration``; :mod:`midus.placement`) or a list of base-layer indices (docs/design.md §3.2).
            None (default): the method's own, ``DEFAULT_PLACEMENT`` ("top-gaps" for opt_deus),
            else "distributed". Solar accepts only the default.
        calibration: int64 token ids (a 1-D stream or [B, T] windows) for placement="importance".
        importance: what placement="importance" measures: "layer" (skip the layer, default) or
            "heads" (remove each attention head on its own; the layer's score is the sum).
        memory: method="midus": a :class:`midus_ops.MemoryOptions` (its fields, defaults and
            validation), or the memory kind "hml" | "pkm" as before. None: the defaults.
        lesa: method="lesa": a :class:`midus.lesa.LesaOptions`. None: the defaults.
        **memory_options: the same options as keywords (still accepted; they override the fields of
            ``memory`` / ``lesa`` when both are given). method="midus": out_proj ("none" | "copy"),
            n, k, d_z, tau, query_norm, learn_tau, pkm_heads, pkm_d_k, deterministic (recorded as
            ``midus_upscale["memory_options"]``). method="lesa": rank, hidden, epochs, batch_size,
            lr, norm_weight, seed, last (recorded as ``midus_upscale["lesa_options"]``).
            method="avg_deus" / "opt_deus": identity (default True: zero the residual writers), and
            for opt_deus reg, max_iter (``midus.deus.OPT_DEUS_DEFAULTS``; recorded as
            ``midus_upscale["deus_options"]``).

    Returns:
        midus: a :class:`MidusForCausalLM` (``model_type="midus"``); the other methods: a model of
        the base class. In both, ``config.midus_upscale`` records method, num_blocks, placement,
        base_layers (i_j), inserted_positions (indices of the new blocks in the new stack),
        layer_order (base layer of each new position) and base_num_layers (with placement
        "importance" also ``importance``: the measure, scores and chosen layers; with avg_deus /
        opt_deus ``deus_layers``: how each new layer was made); it is saved with the model.
        The result is in the same train/eval mode as ``model``. With a zero bank (midus) or zeroed
        residual writers (llama_pro, avg_deus, opt_deus with identity=True) its logits equal the
        base model's; with out_proj="copy" the copied o_proj's bias (if any) is zeroed for the same
        reason. The residual writers are o_proj and down_proj (weights and biases set to 0), or for
        Gemma 3, whose branches end in a norm, that norm's gain (see ``residual_writers``).

    Raises:
        ValueError: unknown ``method``, ``placement`` or ``importance``; ``num_blocks`` outside
            [1, L] (top-gaps: [1, L - 1]); solar with L - K odd or a placement; explicit indices out
            of range or repeated; placement="importance" without ``calibration`` (or ``calibration``
            without it); unsupported model family (the message lists the supported ones); bad
            memory / lesa / deus option values; lesa with L < 3.
        TypeError: options given for a method that takes none, or unknown option names.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if num_blocks is not None:
        num_blocks = _check_int("num_blocks", num_blocks)  # recorded in the config: a Python int
    model_type = _family_of(model)
    memory_options = dict(memory_options)
    if isinstance(memory, MemoryOptions):
        if method != "midus":
            raise TypeError(f"memory (a MemoryOptions) applies to method='midus' only, got method={method!r}")
        memory_options = {**memory.to_dict(), **memory_options}
    elif isinstance(memory, str):
        memory_options["memory"] = memory  # the kind, as a keyword option
    elif memory is not None:
        raise TypeError(f"memory must be a midus_ops.MemoryOptions, a memory kind ('hml' or 'pkm') or None, "
                        f"got {type(memory).__name__}")
    if lesa is not None:
        if not isinstance(lesa, LesaOptions):
            raise TypeError(f"lesa must be a midus.lesa.LesaOptions or None, got {type(lesa).__name__}")
        if method != "lesa":
            raise TypeError(f"lesa options apply to method='lesa' only, got method={method!r}")
        memory_options = {**lesa.to_dict(), **memory_options}
    if method not in ("midus", "lesa") + DEUS_METHODS and memory_options:
        raise TypeError(f"memory options {sorted(memory_options)} apply to method='midus' only (lesa, avg_deus and "
                        f"opt_deus take their own options; {method} takes none), got method={method!r}")
    opts = _check_memory_options(memory_options) if method == "midus" else None
    if opts is not None and opts["memory"] == "hml" and opts["out_proj"] == "none":
        # Without an output projection the heads' read-outs are added to the residual stream as
        # they are, which needs heads * head_dim == hidden_size (not so in e.g. Gemma 3 270M).
        text = model.config.get_text_config()
        heads = int(text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
        if heads * head_dim != text.hidden_size:
            raise ValueError(f"out_proj='none' needs num_attention_heads * head_dim == hidden_size (the memory read-out "
                             f"is added to the residual stream as it is), but this model has {heads} * {head_dim} = "
                             f"{heads * head_dim} != {text.hidden_size}: use out_proj='copy' (or memory='pkm')")
    lesa_opts = check_lesa_options(memory_options) if method == "lesa" else None
    deus_opts = check_deus_options(method, memory_options) if method in DEUS_METHODS else None
    L = model.config.num_hidden_layers
    if len(model.model.layers) != L:
        raise ValueError(f"model.config.num_hidden_layers={L} but the model has {len(model.model.layers)} layers")
    if method == "lesa" and L < 3:
        raise ValueError(f"method='lesa' needs a base model with at least 3 layers (it trains on consecutive "
                         f"triples), got num_hidden_layers={L}")
    if placement is None:
        placement = DEFAULT_PLACEMENT.get(method, "distributed")
    measured = None
    if isinstance(placement, str) and placement == "importance":
        if method == "solar":
            raise ValueError("placement does not apply to method='solar' (its layer order is fixed), got 'importance'")
        if calibration is None:
            raise ValueError("placement='importance' needs calibration text: pass calibration=token_ids (int64, "
                             "e.g. midus.data.load_corpus('wiki', tokenizer, split='train', max_tokens=2048))")
        from .placement import importance_placement

        chosen, measured = importance_placement(model, num_blocks, calibration, measure=importance)
        plan_placement: Placement = chosen
    else:
        if calibration is not None:
            raise ValueError(f"calibration applies to placement='importance' only, got placement={placement!r}")
        from .placement import IMPORTANCE_MEASURES

        if importance not in IMPORTANCE_MEASURES:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCE_MEASURES)}, got {importance!r}")
        plan_placement = placement

    sources, inserted, base_layers = _layer_plan(method, L, num_blocks, plan_placement)
    record = {"method": method, "num_blocks": len(inserted),
              "placement": placement if isinstance(placement, str) else list(base_layers),
              "base_layers": base_layers, "inserted_positions": inserted, "layer_order": sources,
              "base_num_layers": L, "base_model_type": model_type}
    if measured is not None:
        record["importance"] = measured

    if method == "lesa":
        record["lesa_options"] = dict(lesa_opts)
    if deus_opts is not None:
        record["deus_options"] = dict(deus_opts)
    reference = next(model.parameters())
    new_config = copy.deepcopy(model.config)
    _remap_layer_fields(new_config, sources)
    if method == "midus":
        record["memory_options"] = dict(opts)
        config = MidusConfig(text_config=new_config, memory_positions=inserted, midus_upscale=record, **opts)
        new = _build(MidusForCausalLM, config, reference)
        _copy_weights(new, model, sources, set(inserted), renames={"out_proj.": "self_attn.o_proj."})
        for p in inserted:
            out_proj = new.model.layers[p].out_proj
            if out_proj is not None and out_proj.bias is not None:
                with torch.no_grad():  # identity at insertion even when o_proj has a bias
                    out_proj.bias.zero_()
    else:
        new_config.midus_upscale = record
        new = _build(type(model), new_config, reference)
        _copy_weights(new, model, sources, set(), {})
        if method == "lesa":  # the clones of layer i_j are overwritten with the predicted layers
            _insert_lesa_layers(new, model, inserted, base_layers, lesa_opts)
        if method in DEUS_METHODS:  # likewise with the fused layers
            record["deus_layers"] = _insert_deus_layers(new, model, method, inserted, base_layers, deus_opts)
        if method == "llama_pro" or (method in DEUS_METHODS and deus_opts["identity"]):
            _zero_writers(new, model_type, inserted, method)
    new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    return new


@torch.no_grad()
def _insert_deus_layers(new, base, method: str, inserted: List[int], base_layers: List[int],
                        opts: Dict[str, Any]) -> List[dict]:
    """Overwrite the clones at ``inserted`` with the Avg-/OpT-DeUS layers; returns their records."""
    from .deus import predict_layers as deus_layers

    layers = [dict(layer.named_parameters()) for layer in base.model.layers]
    kw = {} if method == "avg_deus" else {"reg": float(opts["reg"]), "max_iter": int(opts["max_iter"])}
    params, records = deus_layers(layers, base_layers, base.config, method, **kw)
    for pos, values in zip(inserted, params):
        target = dict(new.model.layers[pos].named_parameters())
        for name, value in values.items():
            target[name].copy_(value)
    return records


@torch.no_grad()
def _insert_lesa_layers(new, base, inserted: List[int], base_layers: List[int], opts: Dict[str, Any]) -> None:
    """Copy the LESA predictions for the layers after base layers ``base_layers`` into positions ``inserted``."""
    layers = [dict(layer.named_parameters()) for layer in base.model.layers]
    for pos, params in zip(inserted, predict_layers(layers, base_layers, **opts)):
        target = dict(new.model.layers[pos].named_parameters())
        for name, value in params.items():
            target[name].copy_(value)


def _record(model) -> dict:
    record = getattr(model.config, "midus_upscale", None)
    if not record:
        raise ValueError("model.config has no midus_upscale record: the model was not produced by midus.upscale")
    return record


def new_parameter_names(model: PreTrainedModel) -> Set[str]:
    """Names of the parameters of the inserted blocks (the trainer's ``trainable="new"``, docs/design.md §3.4).

    midus: every parameter of the memory blocks (cloned norm/attention, memory, out_proj);
    dus / llama_pro: the clones; solar: the second copies of the duplicated layers (positions
    L - m .. L - m + K - 1 of the new stack; solar's default is to train all parameters).
    Read from ``model.config.midus_upscale["inserted_positions"]``, so it holds after save/load.
    Raises ValueError if the model was not produced by ``upscale``.
    """
    prefixes = tuple(f"model.layers.{p}." for p in _record(model)["inserted_positions"])
    return {name for name, _ in model.named_parameters() if name.startswith(prefixes)}


def memory_parameter_names(model: torch.nn.Module) -> Set[str]:
    """Names of the key/value parameters of the memory layers in ``model`` (docs/design.md §3.4: no weight decay, own LR).

    The naming rule: in a ``HeadwiseMemoryLayer`` the parameters ``subkeys``, ``bank``, ``proj``;
    in a ``ProductKeyMemory`` ``subkeys``, ``values`` (e.g. ``model.layers.3.memory.bank``); in
    either, ``log_tau`` when the layer learns its temperature. Not
    included: a PKM's ``query.weight``, an HML's ``query_norm.weight``. Empty for models without
    memory layers.
    """
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, HeadwiseMemoryLayer):
            leaves = KEY_VALUE_PARAMETER_NAMES["hml"]
        elif isinstance(module, ProductKeyMemory):
            leaves = KEY_VALUE_PARAMETER_NAMES["pkm"]
        else:
            continue
        names.update(f"{module_name}.{leaf}" if module_name else leaf for leaf in leaves
                     if isinstance(getattr(module, leaf, None), torch.nn.Parameter))
    return names
