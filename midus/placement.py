"""Importance-guided placement: put the K new blocks after the base layers that matter most.

:func:`midus.upscale` with ``placement="importance"`` and ``calibration=`` token ids calls
:func:`importance_placement`, which measures on that text how much the mean next-token loss
rises when one base layer is taken out:

- ``importance="layer"`` (default): layer l is skipped (its output replaced by its input, i.e.
  the residual stream passes it unchanged); score = loss(skip l) - loss.
- ``importance="heads"``: each attention head of layer l is removed on its own (its output, the
  head's slice of o_proj's input, set to zero); score = the sum over the layer's heads of
  loss(head removed) - loss; the per-head increases are kept. For MIDUS this puts the memory
  blocks, whose HML reads the per-head outputs of the attention cloned from the layer they
  follow, after the layers whose heads matter most (the reviewers' head-importance request).

The K layers with the largest scores are chosen (ties: the lower index), and the new blocks go
right after them. The rationale is that of layer-importance work on LLMs (e.g. ShortGPT, Men et
al. 2024, arXiv 2403.03853, who remove the layers whose removal changes the hidden state least):
where a layer matters, capacity next to it is most useful; low-importance layers are the
redundant ones. [project: the choice of "after the most important layers" rather than "between
redundant ones" is ours; no depth up-scaling paper we know of places blocks by measured
importance.]

The measurement is deterministic given the model and the text: eval mode, no sampling, the same
windows in the same order; each partial pass re-runs only the layers from the one removed on,
from the layer inputs recorded in a clean pass (bit for bit what a full pass gives). Cost: 1 full
pass plus L partial passes ("layer") or L * H ("heads"), each on average half a full one.
"""
from __future__ import annotations

import sys
import time
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["IMPORTANCE_MEASURES", "layer_importance", "choose_layers", "importance_placement"]

IMPORTANCE_MEASURES = ("layer", "heads")
DEFAULT_WINDOW = 256


def _windows(calibration, window: int, context: Optional[int]) -> torch.Tensor:
    if not isinstance(calibration, torch.Tensor) or calibration.dtype not in (torch.int64, torch.int32):
        raise ValueError("calibration must be an int64 tensor of token ids: a 1-D stream or [B, T] windows, e.g. "
                         "midus.data.load_corpus('wiki', tokenizer, split='train', max_tokens=2048)")
    if calibration.dim() == 2:
        if calibration.shape[0] < 1 or calibration.shape[1] < 2:
            raise ValueError(f"calibration windows must be [B >= 1, T >= 2], got {tuple(calibration.shape)}")
        windows = calibration.long()
    elif calibration.dim() == 1:
        if calibration.numel() < 2:
            raise ValueError(f"calibration has {calibration.numel()} tokens; give at least 2 (a few thousand "
                             f"for a stable ranking)")
        w = min(window, int(calibration.numel()))
        if context is not None:
            w = min(w, int(context))
        n = calibration.numel() // w
        windows = calibration[: n * w].long().view(n, w)
    else:
        raise ValueError(f"calibration must be 1-D (a token stream) or 2-D [B, T], got shape {tuple(calibration.shape)}")
    if context is not None and windows.shape[1] > context:
        raise ValueError(f"calibration windows of {windows.shape[1]} tokens exceed the model's context "
                         f"(max_position_embeddings={context})")
    return windows


class _Skip(nn.Module):
    """Stands in for a decoder layer: returns its input, or ``feed`` (a recorded hidden state)."""

    def __init__(self, layer: nn.Module, feed: Optional[torch.Tensor] = None):
        super().__init__()
        self.attention_type = getattr(layer, "attention_type", "full_attention")
        self.feed = feed

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.feed is None else self.feed


def replace_layer_input(hidden: torch.Tensor):
    """A forward pre-hook (``with_kwargs=True``) that gives a decoder layer ``hidden`` as its
    hidden states, positional or keyword; used to rerun a stack from a recorded layer input."""
    def hook(module, args, kwargs):
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    return hook


def _head_zeroer(head: int, head_dim: int):
    def hook(module, args):
        x = args[0].clone()
        x[..., head * head_dim:(head + 1) * head_dim] = 0
        return (x,) + tuple(args[1:])

    return hook


class _Passes:
    """Loss passes over fixed windows, with partial passes from recorded layer inputs."""

    def __init__(self, model, windows: torch.Tensor, batch_size: int):
        self.model = model
        self.layers = model.model.layers
        device = next(model.parameters()).device
        self.batches = [b.to(device) for b in windows.split(batch_size)]
        self.tokens = int(windows.shape[0] * (windows.shape[1] - 1))
        self.inputs: List[List[torch.Tensor]] = [[] for _ in self.layers]  # layer -> its input per batch

    def loss(self, record: bool = False, start: Optional[int] = None, skip: bool = False,
             head: Optional[Tuple[int, int]] = None) -> float:
        """Mean next-token NLL (nats). ``start``: layers before it are stubs and layer ``start``
        gets its recorded input (needs a ``record=True`` pass first); ``skip``: layer ``start`` is
        skipped too; ``head`` (h, d_h): head h of layer ``start`` is zeroed."""
        total = torch.zeros((), dtype=torch.float64)
        for i, x in enumerate(self.batches):
            saved, hooks = {}, []
            try:
                if record:
                    for j, layer in enumerate(self.layers):
                        hooks.append(layer.register_forward_pre_hook(
                            lambda m, a, k, _j=j: self.inputs[_j].append((a[0] if a else k["hidden_states"]).detach()),
                            with_kwargs=True))
                if start is not None:
                    for j in range(start + (1 if skip else 0)):
                        saved[j] = self.layers[j]
                        feed = self.inputs[start][i] if skip and j == start else None
                        self.layers[j] = _Skip(saved[j], feed)
                    if not skip:
                        hooks.append(self.layers[start].register_forward_pre_hook(
                            replace_layer_input(self.inputs[start][i]), with_kwargs=True))
                    if head is not None:
                        h, dh = head
                        hooks.append(self.layers[start].self_attn.o_proj.register_forward_pre_hook(_head_zeroer(h, dh)))
                with torch.no_grad():
                    logits = self.model(input_ids=x, use_cache=False).logits
            finally:
                for h_ in hooks:
                    h_.remove()
                for j, layer in saved.items():
                    self.layers[j] = layer
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(), reduction="none")
            total += nll.double().sum().cpu()
        return float(total) / self.tokens


def layer_importance(model, calibration: torch.Tensor, measure: str = "layer", window: int = DEFAULT_WINDOW,
                     batch_size: int = 4) -> dict:
    """Per-layer importance of a causal LM of a supported family on calibration text.

    Args:
        model: a transformers causal LM with ``model.model.layers`` (any supported family).
        calibration: int64 token ids, a 1-D stream (cut into disjoint windows of ``window`` tokens,
            the tail dropped; one window if shorter) or [B, T] windows.
        measure: "layer" (skip the layer) or "heads" (zero each attention head on its own).
        window, batch_size: window length and windows per forward pass.

    Returns a JSON-serialisable dict: ``measure``, ``loss`` (the unmodified model, nats/token),
    ``scores`` [L] (loss increase when the layer is removed; "heads": summed over its heads),
    ``head_scores`` [L][H] ("heads" only), ``tokens`` (scored targets), ``windows``, ``seconds``.
    Raises ValueError naming ``calibration`` / ``importance`` for bad input.
    """
    if measure not in IMPORTANCE_MEASURES:
        raise ValueError(f"importance must be one of {', '.join(IMPORTANCE_MEASURES)}, got {measure!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    t0 = time.time()
    text = model.config.get_text_config()
    windows = _windows(calibration, window, getattr(text, "max_position_embeddings", None))
    was_training = model.training
    model.eval()
    try:
        ev = _Passes(model, windows, batch_size)
        base = ev.loss(record=True)
        L = len(ev.layers)
        out = {"measure": measure, "loss": base, "tokens": ev.tokens, "windows": int(windows.shape[0])}
        if measure == "layer":
            out["scores"] = [ev.loss(start=l, skip=True) - base for l in range(L)]
        else:
            H = int(text.num_attention_heads)
            head_scores = []
            for l in range(L):
                attn = ev.layers[l].self_attn
                dh = attn.o_proj.in_features // H
                head_scores.append([ev.loss(start=l, head=(h, dh)) - base for h in range(H)])
            out["head_scores"] = head_scores
            out["scores"] = [sum(row) for row in head_scores]
    finally:
        model.train(was_training)
    out["seconds"] = time.time() - t0
    return out


def choose_layers(scores: Sequence[float], num_blocks: int) -> List[int]:
    """The ``num_blocks`` indices with the largest scores (ties: the lower index), sorted."""
    order = sorted(range(len(scores)), key=lambda l: (-scores[l], l))
    return sorted(order[:num_blocks])


def importance_placement(model, num_blocks: int, calibration: torch.Tensor, measure: str = "layer",
                         window: int = DEFAULT_WINDOW, batch_size: int = 4, log: bool = True) -> Tuple[List[int], dict]:
    """(base-layer indices for the K new blocks, the measurement of :func:`layer_importance` with
    ``chosen`` added). Prints the chosen indices to stderr unless ``log`` is False. Raises
    ValueError for K outside [1, L] or bad calibration / measure."""
    L = len(model.model.layers)
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or not 1 <= num_blocks <= L:
        raise ValueError(f"num_blocks must satisfy 1 <= num_blocks <= num_layers = {L} with placement='importance', "
                         f"got {num_blocks!r}")
    result = layer_importance(model, calibration, measure=measure, window=window, batch_size=batch_size)
    chosen = choose_layers(result["scores"], num_blocks)
    result["chosen"] = chosen
    if log:
        print(f"[midus] placement=importance ({measure}, {result['tokens']} calibration tokens, "
              f"{result['seconds']:.0f} s): new blocks after base layers {chosen}; loss increase when removed: "
              + ", ".join(f"{l}: {s:+.4f}" for l, s in enumerate(result["scores"])), file=sys.stderr, flush=True)
    return chosen, result
