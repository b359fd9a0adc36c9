"""The MIDUS model: memory blocks inside a Llama/Mistral/Qwen2/Qwen3/Gemma 3/Phi-3 decoder stack.

MIDUS: Memory-Infused Depth Up-Scaling (arXiv 2512.13751) sec. 3; docs/design.md §3.1.

This file is self-contained on purpose: ``save_pretrained`` copies it beside the weights so that
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` works in a process that
never imported ``midus``. It may import only torch, transformers and ``midus_ops`` (never the
``midus`` package itself).

Layout of :class:`MidusForCausalLM` (parameter names)::

    model.embed_tokens / model.norm / lm_head          the base family's, unchanged
    model.layers.{i}.*                                 base decoder layers (family classes)
    model.layers.{p}.input_layernorm.weight            memory block p (cloned from its source layer)
    model.layers.{p}.self_attn.{q,k,v}_proj.*          (+ q_norm/k_norm for Qwen3 and Gemma 3; Phi-3: the fused
                                                       qkv_proj; no o_proj for HML)
    model.layers.{p}.post_attention_layernorm.weight   PKM blocks of Gemma 3 only (its attention branch norm)
    model.layers.{p}.out_proj.*                        HML with out_proj="copy" only
    model.layers.{p}.memory.{subkeys,bank,proj}        HeadwiseMemoryLayer (key/value parameters)
    model.layers.{p}.memory.{query.weight,subkeys,values}  ProductKeyMemory (memory="pkm")

``model`` is the family's own ``*Model`` class (a subclass of e.g. ``LlamaModel`` that also records
the memory blocks' outputs as hidden states) built from the nested
``config.text_config`` (whose ``num_hidden_layers`` counts base layers + memory blocks), so the
embedding, RoPE, masks (causal / sliding), KV cache and attention kernels are Hugging Face's.
"""
from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import torch
from torch import nn

import transformers
from transformers import AutoConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # transformers >= 5
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as _BaseConfig

try:  # transformers' import check skips try blocks, so the error below is the one users see
    from midus_ops import HeadwiseMemoryLayer, ProductKeyMemory
    from midus_ops.layers import _UsageStats
except ImportError as _err:
    raise ImportError("this MIDUS model needs the `midus_ops` memory layers, which the `midus` package provides: "
                      "install it from its repository with `pip install --no-build-isolation .` "
                      f"(import failed: {_err})") from _err

__all__ = ["MidusConfig", "MidusForCausalLM", "MidusPreTrainedModel", "MidusMemoryBlock", "SUPPORTED_FAMILIES",
           "family_classes", "MEMORY_DEFAULTS"]

_TF_MAJOR = int(transformers.__version__.split(".")[0])

# model_type -> class-name prefix in transformers.models.<module>.modeling_<module> (module: the
# model_type unless _FAMILY_MODULES says otherwise).
SUPPORTED_FAMILIES: Dict[str, str] = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
                                      "gemma3_text": "Gemma3", "phi3": "Phi3"}
# Gemma 3's text-only model (model_type "gemma3_text") lives in the gemma3 module, whose
# Gemma3Model is the multimodal one: its decoder stack is Gemma3TextModel.
_FAMILY_MODULES: Dict[str, str] = {"gemma3_text": "gemma3"}
_FAMILY_CLASS_NAMES: Dict[str, Dict[str, str]] = {"gemma3_text": {"Model": "Gemma3TextModel"}}
# Families whose decoder layer normalises the attention branch before adding it to the residual
# stream (Gemma 3's post_attention_layernorm; Llama's layer of that name is the pre-FFN norm).
_POST_ATTENTION_NORM_FAMILIES = ("gemma3_text",)

# Memory options of a MIDUS block and their defaults (docs/design.md §2.1 [project] defaults, §3.1).
MEMORY_DEFAULTS: Dict[str, Any] = {
    "memory": "hml",      # "hml" (HeadwiseMemoryLayer over the heads' outputs) or "pkm" (ProductKeyMemory)
    "out_proj": "none",   # HML: "none" (paper) or "copy" (a clone of the source layer's o_proj)
    "n": 32,              # sub-keys per half: n*n slots
    "k": 16,              # slots read per (token, head)
    "d_z": 256,           # HML latent bank width
    "tau": 1.0,           # softmax temperature
    "query_norm": "none",  # HML query normalisation: "none" or "rms"
    "learn_tau": False,   # a learned softmax temperature per head (log_tau, initialised at log(tau))
    "pkm_heads": 4,       # PKM memory heads
    "pkm_d_k": 128,       # PKM query width per head
}


def family_classes(model_type: str) -> SimpleNamespace:
    """The transformers classes of a supported family: Model, ForCausalLM, DecoderLayer, Attention, RMSNorm.

    Raises ValueError naming ``model_type`` and listing the supported families.
    """
    prefix = SUPPORTED_FAMILIES.get(model_type)
    if prefix is None:
        raise ValueError(f"unsupported model family model_type={model_type!r}; supported families: "
                         f"{', '.join(sorted(SUPPORTED_FAMILIES))}")
    module = _FAMILY_MODULES.get(model_type, model_type)
    mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    names = _FAMILY_CLASS_NAMES.get(model_type, {})
    return SimpleNamespace(**{name: getattr(mod, names.get(name, prefix + name))
                              for name in ("Model", "ForCausalLM", "DecoderLayer", "Attention", "RMSNorm")})


def _check_memory_options(opts: Dict[str, Any]) -> Dict[str, Any]:
    """Fill defaults and validate; errors name the option."""
    unknown = set(opts) - set(MEMORY_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown memory option(s) {sorted(unknown)}; known options: {sorted(MEMORY_DEFAULTS)}")
    out = {**MEMORY_DEFAULTS, **opts}
    if out["memory"] not in ("hml", "pkm"):
        raise ValueError(f"memory must be 'hml' or 'pkm', got {out['memory']!r}")
    if out["out_proj"] not in ("none", "copy"):
        raise ValueError(f"out_proj must be 'none' or 'copy', got {out['out_proj']!r}")
    if out["memory"] == "pkm" and out["out_proj"] != "none":
        raise ValueError("out_proj='copy' applies to memory='hml' only (the pkm block keeps the cloned o_proj "
                         "inside its attention)")
    if out["query_norm"] not in ("none", "rms"):
        raise ValueError(f"query_norm must be 'none' or 'rms', got {out['query_norm']!r}")
    for key in ("n", "k", "d_z", "pkm_heads", "pkm_d_k"):
        # numpy and other integer types are taken as ints (converted: the config is JSON)
        if isinstance(out[key], bool) or not hasattr(type(out[key]), "__index__") or out[key] < 1:
            raise ValueError(f"{key} must be a positive int, got {out[key]!r}")
        out[key] = int(out[key])
    if out["k"] > out["n"]:
        raise ValueError(f"k must satisfy 1 <= k <= n = {out['n']}, got k = {out['k']}")
    if not float(out["tau"]) > 0:
        raise ValueError(f"tau must be > 0, got {out['tau']!r}")
    if not isinstance(out["learn_tau"], bool):
        raise ValueError(f"learn_tau must be True or False, got {out['learn_tau']!r}")
    return out


class MidusConfig(_BaseConfig):
    """Configuration of an up-scaled MIDUS model (``model_type = "midus"``).

    Args:
        text_config: the base family's config (a ``LlamaConfig``/``MistralConfig``/``Qwen2Config``/
            ``Qwen3Config`` or its dict) describing the whole up-scaled stack: its
            ``num_hidden_layers`` counts base layers and memory blocks, its ``layer_types`` (when the
            family has them) gives each position's attention type.
        memory_positions: indices in that stack of the memory blocks (each follows its source layer).
        memory, out_proj, n, k, d_z, tau, query_norm, pkm_heads, pkm_d_k, learn_tau: the memory options, see
            ``MEMORY_DEFAULTS`` (docs/design.md §2.1, §3.1).
        midus_upscale: the record written by ``midus.upscale`` (method, K, placement, positions).

    ``get_text_config()`` returns ``text_config``; generation, caches and masks read it.
    """

    model_type = "midus"
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, text_config=None, memory_positions: Optional[List[int]] = None,
                 memory: str = "hml", out_proj: str = "none",
                 n: int = 32, k: int = 16, d_z: int = 256, tau: float = 1.0, query_norm: str = "none",
                 pkm_heads: int = 4, pkm_d_k: int = 128, midus_upscale: Optional[dict] = None,
                 learn_tau: bool = False, **kwargs):
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            text_config = AutoConfig.for_model(text_config.pop("model_type", "llama"), **text_config)
        elif text_config is None:  # a default-constructible config (transformers requires one)
            text_config = AutoConfig.for_model("llama", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
        self.text_config = text_config
        self.memory_positions = [int(p) for p in (memory_positions or [])]
        opts = _check_memory_options(dict(memory=memory, out_proj=out_proj, n=n, k=k, d_z=d_z, tau=tau,
                                          query_norm=query_norm, pkm_heads=pkm_heads, pkm_d_k=pkm_d_k,
                                          learn_tau=learn_tau))
        for key, value in opts.items():
            setattr(self, key, value)
        self.midus_upscale = midus_upscale
        # Tying is decided on the outer config; the base family decides it in its own config.
        kwargs["tie_word_embeddings"] = bool(getattr(text_config, "tie_word_embeddings", False))
        # The base's attention implementation (e.g. "eager" for output_attentions) is the model's:
        # without it the base config's __init__ sets None on every sub-config (transformers 5), and
        # the model then picks its default ("sdpa").
        if kwargs.get("attn_implementation") is None:
            kwargs["attn_implementation"] = getattr(text_config, "_attn_implementation_internal", None)
        super().__init__(**kwargs)
        L = text_config.num_hidden_layers
        bad = [p for p in self.memory_positions if not 0 <= p < L]
        if bad or len(set(self.memory_positions)) != len(self.memory_positions):
            raise ValueError(f"memory_positions must be distinct indices in [0, {L}) (text_config.num_hidden_layers),"
                             f" got {self.memory_positions}")

    @property
    def memory_options(self) -> Dict[str, Any]:
        """The memory options as a dict (keys of ``MEMORY_DEFAULTS``)."""
        return {key: getattr(self, key) for key in MEMORY_DEFAULTS}


def _text_config_field(name: str) -> property:
    # Tools that read config.hidden_size or config.num_hidden_layers (profilers, exporters, scripts)
    # see the whole up-scaled stack's values; written ones go to the text config, the one source.
    def get(self):
        return getattr(self.text_config, name)

    def set_(self, value):
        setattr(self.text_config, name, value)

    return property(get, set_, doc=f"``text_config.{name}`` (the whole up-scaled stack).")


for _name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "vocab_size", "max_position_embeddings", "head_dim"):
    setattr(MidusConfig, _name, _text_config_field(_name))


def _no_output_projection(attn_output: torch.Tensor) -> torch.Tensor:
    return attn_output


_HEADS_ATTENTION_CLASSES: Dict[str, type] = {}

# Keyword by which MidusForCausalLM hands the memory blocks the padding mask [B, T] (through the
# family model and its layers, which pass unknown keywords on, as they do for the attention kernels).
MIDUS_TOKEN_MASK = "midus_token_mask"


def _token_mask(attention_mask, input_ids, inputs_embeds) -> Optional[torch.Tensor]:
    """[B, T] True at the real tokens of this call, from a 2-D padding mask [B, past + T] (as
    generate passes it, the current tokens last); None for no mask or a 4-D/custom one."""
    ref = input_ids if input_ids is not None else inputs_embeds
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or ref is None:
        return None
    T = ref.shape[1]
    if attention_mask.shape[0] != ref.shape[0] or attention_mask.shape[1] < T:
        return None
    return attention_mask[:, attention_mask.shape[1] - T:] != 0


def _heads_attention_class(model_type: str) -> type:
    """The family's attention class without its output projection (``o_proj``), for HML blocks.

    Same ``__init__``, parameter names and ``forward`` as the family's class (RoPE, GQA, q/k norms,
    every attention kernel, the cache), whose forward then returns the heads' outputs
    ``concat_h o_h`` [B, T, H * d_h] in head-major order. The instance has no ``o_proj``
    submodule: tools that find modules by name (PEFT LoRA with the usual targets
    ``q_proj, k_proj, v_proj, o_proj``) must not find a non-Linear one there (an ``nn.Identity``
    did, and PEFT refused it). The ``o_proj`` the family's ``__init__`` builds is taken out by
    :class:`MidusMemoryBlock` (kept as ``out_proj`` with out_proj="copy").
    """
    if model_type not in _HEADS_ATTENTION_CLASSES:
        fam = family_classes(model_type)
        name = f"Midus{SUPPORTED_FAMILIES[model_type]}HeadsAttention"
        # A property on the class wins over the submodule the family's __init__ registers under the
        # same name (nn.Module looks submodules up only when normal attribute lookup fails), so
        # the family's forward calls the identity.
        attrs = {"__module__": __name__, "__doc__": _heads_attention_class.__doc__,
                 "o_proj": property(lambda self: _no_output_projection,
                                    doc="No output projection: the identity (a function, not a module).")}
        cls = type(name, (fam.Attention,), attrs)
        globals()[name] = cls  # reachable by name, so that pickling a model (torch.save) finds it
        _HEADS_ATTENTION_CLASSES[model_type] = cls
    return _HEADS_ATTENTION_CLASSES[model_type]


class MidusMemoryBlock(GradientCheckpointingLayer):
    """One MIDUS memory block at position ``layer_idx`` of the stack (docs/design.md §3.1).

    memory="hml"::

        o = Attn'(RMSNorm(x))      per-head outputs [B, T, H, d_h] (the attention without o_proj)
        r = HML(o)                 [B, T, H, d_h]
        M(x) = x + concat_h r_h    (or x + out_proj(concat_h r_h) with out_proj="copy")

    memory="pkm"::

        a = x + Attn(RMSNorm(x))   (the attention with its o_proj; Gemma 3: its post-attention norm too)
        M(x) = x + PKM(a)

    The attention is the family's own class (RoPE, GQA, q/k norms, sdpa/eager/flash, sliding
    window from ``config.layer_types``), with its own ``layer_idx`` and so its own KV-cache slot;
    for HML a subclass without ``o_proj`` (:func:`_heads_attention_class`).
    No FFN. With a zero bank (HML) or zero values (PKM) the block is exactly the identity.

    Input and output: hidden states [B, T, d], dtype of the model.
    """

    def __init__(self, config, layer_idx: int, memory_options: Dict[str, Any]):
        super().__init__()
        fam = family_classes(config.model_type)
        opts = _check_memory_options(dict(memory_options))
        self.layer_idx = layer_idx
        self.memory_kind = opts["memory"]
        # transformers 4.x Qwen2/3 models pick each layer's mask through `layer.attention_type`.
        layer_types = getattr(config, "layer_types", None)
        self.attention_type = layer_types[layer_idx] if layer_types else "full_attention"
        self.input_layernorm = fam.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        attention = _heads_attention_class(config.model_type) if self.memory_kind == "hml" else fam.Attention
        self.self_attn = attention(config=config, layer_idx=layer_idx)
        self.num_heads = config.num_attention_heads
        self.head_dim = self.self_attn.head_dim
        self.out_proj = None
        if self.memory_kind == "hml":
            o_proj = self.self_attn._modules.pop("o_proj")  # the family's o_proj (bias or not)
            if opts["out_proj"] == "copy":
                self.out_proj = o_proj
            self.memory = HeadwiseMemoryLayer(self.num_heads, self.head_dim, n=opts["n"], k=opts["k"],
                                              d_z=opts["d_z"], tau=opts["tau"], query_norm=opts["query_norm"],
                                              learn_tau=opts["learn_tau"])
        else:
            if config.model_type in _POST_ATTENTION_NORM_FAMILIES:
                # a = x + post_norm(Attn(norm(x))), as the source layer computes it (cloned with it)
                self.post_attention_layernorm = fam.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.memory = ProductKeyMemory(config.hidden_size, num_heads=opts["pkm_heads"], n=opts["n"],
                                           k=opts["k"], d_k=opts["pkm_d_k"], tau=opts["tau"], value_init="zeros",
                                           learn_tau=opts["learn_tau"])

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None,
                position_embeddings=None, **kwargs) -> torch.Tensor:
        # kwargs carry the cache (named `past_key_values` or `cache` depending on the transformers
        # version), use_cache, cache_position, ...: passed to the attention untouched; and
        # MIDUS_TOKEN_MASK [B, T] from MidusForCausalLM: the tokens the memory's statistics count.
        token_mask = kwargs.pop(MIDUS_TOKEN_MASK, None)
        if token_mask is not None and token_mask.shape != hidden_states.shape[:-1]:
            token_mask = None  # not these tokens (e.g. the block called on its own): count them all
        attn_out = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                  position_ids=position_ids, position_embeddings=position_embeddings, **kwargs)[0]
        # token_mask only when there is one: a replaced memory forward (midus.analyze, a user's
        # patch) may take the input alone
        mask = {} if token_mask is None else {"token_mask": token_mask}
        if self.memory_kind == "pkm":
            post_norm = getattr(self, "post_attention_layernorm", None)
            if post_norm is not None:
                attn_out = post_norm(attn_out)
            return hidden_states + self.memory(hidden_states + attn_out, **mask)
        o = attn_out.view(*attn_out.shape[:-1], self.num_heads, self.head_dim)
        r = self.memory(o, **mask).flatten(-2)
        if self.out_proj is not None:
            r = self.out_proj(r)
        return hidden_states + r


@torch.no_grad()
def _init_memory_weights(module: nn.Module) -> None:
    """The memory layers' part of ``_init_weights``, which transformers calls on every module after
    ``from_pretrained`` (and ``post_init``): the usage statistics are non-persistent buffers, never
    in a checkpoint, which transformers 5 allocates uninitialised (``empty_like``); they start at
    zero. A memory parameter missing from the checkpoint gets the layer's own init (zero bank /
    values); loaded ones are left alone (transformers 5 guards ``nn.init`` with their loaded flag).
    The statistics module is handled on its own too: remote-code loading skips a module whose own
    parameters all loaded, so the layer may not be visited."""
    if isinstance(module, (HeadwiseMemoryLayer, ProductKeyMemory)):
        module.reset_parameters()
        module.reset_memory_stats()
    elif isinstance(module, _UsageStats):
        module.reset()


_STACK_CLASSES: Dict[str, type] = {}


def _stack_model_class(model_type: str) -> type:
    """The family's ``*Model`` with memory blocks also recorded as layers by ``output_hidden_states``.

    transformers collects hidden states with hooks on the classes in ``_can_record_outputs``
    (the family's decoder layer only); the subclass adds :class:`MidusMemoryBlock` so that
    ``hidden_states`` has one entry per position of the stack. Same forward, same parameter names.
    """
    if model_type not in _STACK_CLASSES:
        fam = family_classes(model_type)
        family_init = fam.Model._init_weights

        def _init_weights(self, module):
            family_init(self, module)
            _init_memory_weights(module)

        attrs = {"__module__": __name__, "_init_weights": _init_weights}
        record = dict(getattr(fam.Model, "_can_record_outputs", None) or {})
        if "hidden_states" in record:
            layers = record["hidden_states"]
            layers = list(layers) if isinstance(layers, (list, tuple)) else [layers]
            record["hidden_states"] = layers + [MidusMemoryBlock]
            attrs["_can_record_outputs"] = record
        name = f"Midus{SUPPORTED_FAMILIES[model_type]}Model"
        _STACK_CLASSES[model_type] = globals()[name] = type(name, (fam.Model,), attrs)  # globals: see above
    return _STACK_CLASSES[model_type]


class MidusPreTrainedModel(PreTrainedModel):
    config_class = MidusConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MidusMemoryBlock"] + [p + "DecoderLayer" for p in SUPPORTED_FAMILIES.values()]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_flash_attn_2 = True  # transformers 4.x name
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        _init_memory_weights(module)


def _apply_can_return_tuple(fn):
    try:
        from transformers.utils import can_return_tuple
    except ImportError:  # very old transformers: return_dict is handled by the caller
        return fn
    return can_return_tuple(fn)


class MidusForCausalLM(MidusPreTrainedModel, GenerationMixin):
    """Causal LM with MIDUS memory blocks (docs/design.md §3.1, §3.3). Built from a :class:`MidusConfig`.

    Usually obtained from ``midus.upscale(model, "midus", K)`` or ``from_pretrained``. Forward:
    ``input_ids`` [B, T] int64 (or ``inputs_embeds`` [B, T, d]) -> ``logits`` [B, T, vocab] in the
    model dtype, ``loss`` (mean next-token cross-entropy) when ``labels`` is given; the cache
    keyword of the installed transformers (``past_key_values`` or ``cache``) passes through.
    The memory layers' usage statistics (``memory_stats``) count the tokens where a 2-D
    ``attention_mask`` [B, T] (or [B, past + T]) is 1, every token without one.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} if _TF_MAJOR >= 5 else ["lm_head.weight"]

    def __init__(self, config: MidusConfig):
        super().__init__(config)
        text = config.text_config
        self.model = _stack_model_class(text.model_type)(text)
        opts = config.memory_options
        for p in config.memory_positions:
            # Replaces the full decoder layer the family model built at p (its weights are unused).
            self.model.layers[p] = MidusMemoryBlock(text, p, opts)
        self.vocab_size = text.vocab_size
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model

    @_apply_can_return_tuple
    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, use_cache: Optional[bool] = None,
                logits_to_keep=0, **kwargs) -> CausalLMOutputWithPast:
        # The memory layers' usage statistics count only the real tokens (not padding).
        token_mask = _token_mask(attention_mask, input_ids, inputs_embeds)
        if token_mask is not None:
            kwargs[MIDUS_TOKEN_MASK] = token_mask
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        kwargs.pop(MIDUS_TOKEN_MASK, None)  # not for the loss function
        hidden = outputs[0]
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        cap = getattr(self.config.text_config, "final_logit_softcapping", None)
        if cap is not None:  # Gemma-style soft cap, as the family's ForCausalLM applies it
            logits = torch.tanh(logits / cap) * cap
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size,
                                      **kwargs)
        # Same field names as the inner output (past_key_values / cache, hidden_states, attentions),
        # whatever this transformers version calls them.
        rest = {key: value for key, value in outputs.items() if key != "last_hidden_state"}
        return CausalLMOutputWithPast(loss=loss, logits=logits, **rest)


# save_pretrained then writes `auto_map` and copies this file (trust_remote_code loading).
MidusConfig.register_for_auto_class()
MidusForCausalLM.register_for_auto_class("AutoModelForCausalLM")
