"""Analyses of the memory blocks of a MIDUS model (docs/design.md §3.5; MIDUS, arXiv 2512.13751).

- :func:`head_importance`: per memory block and head, the loss increase when that head's
  memory read-out is zeroed (and when the whole block's read-out is zeroed).
- :func:`fixed_retrieval`: the loss when retrieval is replaced by one fixed slot set for every
  token, or by random slots, against the learned retrieval and against no memory at all.
- :func:`memory_usage`: the statistics of docs/design.md §2.1 (fraction of slots read, KL of slot use from
  uniform, top-k weight entropy) per block and head over the evaluation tokens.

Each returns a JSON-serialisable dict; ``plot_*`` draws it with matplotlib; :func:`run_analyses`
does all and writes ``<name>.json`` + ``<name>.png`` into a folder; :func:`add_arguments` and
:func:`run` are the ``midus analyze`` subcommand.

Loss: mean next-token cross-entropy (nats) over disjoint windows of ``window`` tokens cut from the
evaluation stream (:func:`midus.data.pack_sequences`; the tail is dropped), i.e. what
:func:`midus.evaluate.perplexity` computes with ``stride == window``; NLL summed in float64.

How the interventions work (nothing is patched): every memory layer takes retrieval hooks
(``register_retrieval_hook``, :mod:`midus_ops.layers`), called after its top-k and softmax and
before the read-out. :func:`override_memory` registers one per memory module for the duration of a
pass, through which a ``select`` function replaces the slot indices and weights per (token, head)
and a ``record`` callback sees them; :func:`memory_forward` does the same for one call. Without
``select`` the output is the layer's bit for bit (tested). The layers' usage statistics are not
updated meanwhile.
Zeroing a head sets its k weights to 0, so its read-out is exactly zero; with ``out_proj="none"``
and every head of a block zeroed the block is exactly the identity (docs/design.md §3.1).

Head importance re-runs only the part of the stack a block can change: a clean pass records each
memory block's input per batch, and the pass that ablates block j replaces the layers before it
by stubs and feeds the recorded input to block j (same values, same batch: the result is the one
a full pass would give, bit for bit). For the up-scaled SmolLM2 (8 blocks x 9 heads) that is 80
partial passes, each on average about half the cost of a full one (the LM head is always run).

For ``memory="pkm"`` blocks the "heads" are the PKM memory heads (each a query over the full
hidden state; their reads are summed), and zeroing one drops its k weights from the shared bag.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from midus_ops import HeadwiseMemoryLayer, ProductKeyMemory
from midus_ops.reference import accumulation_dtype

from .placement import replace_layer_input

__all__ = ["ANALYSES", "DEFAULT_TOKENS", "DEFAULT_WINDOW", "memory_blocks", "memory_forward", "override_memory",
           "slot_scores", "zero_heads", "head_importance", "fixed_slot_sets", "retrieval_loss", "fixed_retrieval",
           "memory_usage", "memory_health", "plot_head_importance", "plot_fixed_retrieval", "plot_memory_usage", "run_analyses",
           "add_arguments", "run"]

ANALYSES = ("heads", "fixed", "usage")
_FILE_NAMES = {"heads": "head_importance", "fixed": "fixed_retrieval", "usage": "memory_usage"}
# Default evaluation size: 256 tokens = 2 windows of 128 (254 scored). Head importance on the
# up-scaled SmolLM2 (8 blocks x 9 heads) is 1 full + 80 partial passes, the rest 10 full passes;
# 512 tokens took 400 s of CPU time in all (about 3.5 min of wall time on 2 idle cores), so 256
# keeps the default `midus analyze` near 2 minutes. Raise --tokens for steadier figures.
DEFAULT_TOKENS = 256
DEFAULT_WINDOW = 128

# select(q, scores, indices, weights) -> (indices, weights), all [N, H, k] (q [N, H, d_k]).
Select = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]
Memory = nn.Module  # HeadwiseMemoryLayer or ProductKeyMemory


# ----------------------------------------------------------------------------- finding the blocks


def memory_blocks(model) -> List[Tuple[int, Memory]]:
    """``[(position, memory_module)]`` of the model's memory blocks, in stack order.

    A memory block is a decoder layer with a ``memory`` attribute that is a
    :class:`~midus_ops.HeadwiseMemoryLayer` or :class:`~midus_ops.ProductKeyMemory` (what
    ``midus.upscale(..., "midus")`` inserts, docs/design.md §3.1); position = its index in the stack.
    Raises ValueError if the model has none (e.g. a base model, or dus/llama_pro/solar results).
    """
    layers = _decoder_layers(model)
    found = [(p, layer.memory) for p, layer in enumerate(layers)
             if isinstance(getattr(layer, "memory", None), (HeadwiseMemoryLayer, ProductKeyMemory))]
    if not found:
        name = type(model).__name__
        raise ValueError(f"model: {name} has no memory blocks (HeadwiseMemoryLayer / ProductKeyMemory) to analyse; "
                         f"give a MIDUS model (midus.upscale(model, 'midus', ...) or a folder saved from one)")
    return found


def _decoder_layers(model) -> nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"model: {type(model).__name__} has no decoder layer list (model.model.layers); "
                         f"give a MIDUS causal LM")
    return layers


def _kind(memory: Memory) -> str:
    return "hml" if isinstance(memory, HeadwiseMemoryLayer) else "pkm"


# ----------------------------------------------------------------------------- interventions


def _retrieval_hook(select: Optional[Select], record: Optional[Callable[[torch.Tensor, torch.Tensor], None]]):
    def hook(layer, q, scores, idx, w):
        if select is not None:
            idx, w = select(q, scores, idx, w)
        if record is not None:
            record(idx, w)
        return (idx, w) if select is not None else None
    return hook


@contextmanager
def override_memory(modules: Dict[Memory, Optional[Select]],
                    record: Optional[Dict[Memory, Callable[[torch.Tensor, torch.Tensor], None]]] = None):
    """Within the block, each given memory module's retrieval goes through its ``select``
    (``select(q, scores, indices, weights) -> (indices, weights)``, all [N, H, k], q [N, H, d_k],
    weights fp32 or fp64 for fp64 input; None: the learned retrieval) and its ``record`` callback
    sees the (possibly replaced) ``(indices, weights)`` of every call; a retrieval hook of the
    layer (``register_retrieval_hook``), removed on exit (also on error). The usage statistics of
    the modules are not updated meanwhile. Forward hooks on the modules still run."""
    record = record or {}
    handles, tracking = [], {}
    try:
        for module, select in modules.items():
            if not isinstance(module, (HeadwiseMemoryLayer, ProductKeyMemory)):
                raise TypeError(f"override_memory takes HeadwiseMemoryLayer / ProductKeyMemory modules, got "
                                f"{type(module).__name__}")
            tracking[module] = module.track_stats
            module.track_stats = False
            handles.append(module.register_retrieval_hook(_retrieval_hook(select, record.get(module))))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, was in tracking.items():
            module.track_stats = was


def memory_forward(memory: Memory, x: torch.Tensor, select: Optional[Select] = None,
                   record: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None) -> torch.Tensor:
    """``memory(x)`` with its retrieval replaced by ``select`` and shown to ``record``
    (:func:`override_memory` for one call).

    Args:
        memory: a :class:`~midus_ops.HeadwiseMemoryLayer` (x [..., H, d_h] -> [..., H, d_h]) or a
            :class:`~midus_ops.ProductKeyMemory` (x [..., d] -> [..., d_out]).
        x: its input, any float dtype (the computation runs in it, as the layer's does).
        select: ``select(q, scores, indices, weights) -> (indices, weights)``, all [N, H, k]
            (q [N, H, d_k]; weights fp32, or fp64 for fp64 input): replaces the retrieval.
        record: called with the (possibly replaced) ``(indices, weights)`` of every call.

    Without ``select`` the output equals ``memory(x)`` bit for bit. The layer's usage statistics
    are not updated. Raises ValueError for an input of the wrong shape.
    """
    with override_memory({memory: select}, {memory: record} if record is not None else None):
        return memory(x)


def zero_heads(heads: Iterable[int]) -> Select:
    """A ``select`` that sets the weights of the given heads to 0: their read-out is exactly zero."""
    heads = sorted(set(int(h) for h in heads))

    def select(q, scores, idx, w):
        mask = torch.zeros(w.shape[1], dtype=torch.bool, device=w.device)
        mask[heads] = True
        return idx, w.masked_fill(mask.view(1, -1, 1), 0.0)

    return select


def slot_scores(memory: Memory, q: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Product-key scores of arbitrary slots: s[t, h, j] = <K1_h[a], q1> + <K2_h[b], q2> with
    indices[t, h, j] = a * n + b (docs/design.md §1.1), in fp32 (fp64 for fp64 q).

    q [N, H, d_k]; indices [N, H, m] or [H, m] (the same slots for every token), int64 in [0, n*n).
    Returns [N, H, m]. For the layer's own top-k indices these are its top-k scores.
    """
    acc = accumulation_dtype(q.dtype)  # as the layers score
    half = q.shape[-1] // 2
    keys = memory.subkeys.to(acc)
    qa = q.to(acc)
    s1 = torch.einsum("thd,hid->thi", qa[..., :half], keys[:, 0])  # [N, H, n]
    s2 = torch.einsum("thd,hid->thi", qa[..., half:], keys[:, 1])
    if indices.dim() == 2:
        indices = indices.unsqueeze(0).expand(q.shape[0], -1, -1)
    n = memory.n
    return s1.gather(-1, indices // n) + s2.gather(-1, indices % n)


# ----------------------------------------------------------------------------- evaluation passes


def _windows(input_ids: torch.Tensor, window: int) -> torch.Tensor:
    """[B, T] evaluation windows: a 1-D stream is cut into disjoint windows of ``window`` tokens
    (tail dropped); a 2-D tensor is used as it is."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("input_ids must be an int64 tensor: a 1-D token stream or [B, T] windows")
    if input_ids.dim() == 2:
        if input_ids.shape[1] < 2 or input_ids.shape[0] < 1:
            raise ValueError(f"input_ids windows must be [B >= 1, T >= 2], got {tuple(input_ids.shape)}")
        return input_ids.long()
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be 1-D (a token stream) or 2-D [B, T], got shape {tuple(input_ids.shape)}")
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    if input_ids.numel() < window:
        raise ValueError(f"input_ids has {input_ids.numel()} tokens, fewer than one window of {window}; "
                         f"give more tokens or a smaller window")
    from .data import pack_sequences

    return pack_sequences(input_ids.long(), window)


class _Skip(nn.Module):
    """Stands in for a layer before the one a partial pass starts at: returns its input unchanged."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.attention_type = getattr(layer, "attention_type", "full_attention")

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Evaluator:
    """Loss passes over fixed windows; optionally records, and restarts from, memory blocks' inputs."""

    def __init__(self, model, input_ids, window: int, batch_size: int, device=None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model = model
        self.blocks = memory_blocks(model)
        self.layers = _decoder_layers(model)
        windows = _windows(input_ids, window)
        context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if context is not None and windows.shape[1] > context:
            raise ValueError(f"window={windows.shape[1]} exceeds the model's context "
                             f"(max_position_embeddings={context})")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.batches = [b.to(self.device) for b in windows.split(batch_size)]
        self.tokens = int(windows.shape[0] * (windows.shape[1] - 1))  # scored targets
        self.window = int(windows.shape[1])
        self.inputs: Dict[int, List[torch.Tensor]] = {}  # position -> block input per batch
        self.passes = 0

    def loss(self, selects: Optional[Dict[int, Select]] = None, record=None, start: Optional[int] = None,
             keep_inputs: bool = False, intervene: bool = True) -> float:
        """Mean next-token NLL (nats). ``selects``: position -> select; ``record``: position ->
        callback; ``start``: run only layers from this memory block on (needs a previous
        ``keep_inputs=True`` pass); ``intervene=False`` runs the layers without retrieval hooks (their
        usage statistics then record)."""
        selects, record = selects or {}, record or {}
        by_pos = dict(self.blocks)
        bad = [p for p in list(selects) + list(record) if p not in by_pos]
        if bad:
            raise ValueError(f"positions {bad} are not memory blocks (blocks at {sorted(by_pos)})")
        if start is not None and start not in self.inputs:
            raise RuntimeError("a partial pass needs the block inputs of a keep_inputs=True pass")
        modules = {m: selects.get(p) for p, m in self.blocks} if intervene else {}
        records = {by_pos[p]: fn for p, fn in record.items()}
        hooks, saved = [], {}
        total = torch.zeros((), dtype=torch.float64)
        if keep_inputs:
            self.inputs = {p: [] for p, _ in self.blocks}
        was_training = self.model.training
        self.model.eval()
        try:
            for i, x in enumerate(self.batches):
                if keep_inputs:
                    for p, _ in self.blocks:
                        hooks.append(self.layers[p].register_forward_pre_hook(self._keeper(p), with_kwargs=True))
                if start is not None:
                    saved = {j: self.layers[j] for j in range(start)}
                    for j, layer in saved.items():
                        self.layers[j] = _Skip(layer)
                    hooks.append(self.layers[start].register_forward_pre_hook(
                        replace_layer_input(self.inputs[start][i]), with_kwargs=True))
                try:
                    with torch.no_grad(), override_memory(modules, records):
                        logits = self.model(input_ids=x, use_cache=False).logits
                finally:
                    for h in hooks:
                        h.remove()
                    hooks.clear()
                    for j, layer in saved.items():
                        self.layers[j] = layer
                    saved = {}
                nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(), reduction="none")
                total += nll.double().sum().cpu()  # per-token fp32 NLL, summed in fp64
        finally:
            self.model.train(was_training)
        self.passes += 1
        return float(total) / self.tokens

    def _keeper(self, p: int):
        def hook(module, args, kwargs):
            self.inputs[p].append((args[0] if args else kwargs["hidden_states"]).detach())

        return hook


def _block_record(evaluator: _Evaluator) -> List[dict]:
    return [{"block": j, "position": p, "kind": _kind(m), "heads": int(m.num_heads), "slots": int(m.n * m.n),
             "k": int(m.k)} for j, (p, m) in enumerate(evaluator.blocks)]


def _common(evaluator: _Evaluator, analysis: str) -> dict:
    return {"analysis": analysis, "spec": "docs/design.md §3.5", "tokens": evaluator.tokens,
            "windows": sum(int(b.shape[0]) for b in evaluator.batches),
            "window": evaluator.window, "loss_unit": "nats per token (mean next-token cross-entropy)"}


# ----------------------------------------------------------------------------- head importance


def head_importance(model, input_ids: torch.Tensor, window: int = DEFAULT_WINDOW, batch_size: int = 4,
                    device=None, progress: bool = False) -> dict:
    """Loss increase when one head's memory read-out is zeroed, per memory block and head (docs/design.md §3.5).

    Args:
        model: a MIDUS causal LM (memory blocks of kind hml or pkm; for pkm the heads are the
            memory heads).
        input_ids: a 1-D int64 token stream (cut into disjoint windows of ``window`` tokens) or
            [B, T] windows.
        window, batch_size: window length and windows per forward pass.
        device: default the model's.
        progress: a tqdm bar over the passes.

    Returns a dict: ``loss`` (learned retrieval), and per block (``blocks``, stack order)
    ``position``, ``kind``, ``heads``, ``loss_zeroed`` [H] and ``delta`` [H] (= loss_zeroed - loss,
    nats; positive: the head helps), ``block_zeroed_loss`` / ``block_zeroed_delta`` (every head of
    the block zeroed), plus ``tokens``, ``seconds``. Costs 1 full and K * (H + 1) partial passes.
    Raises ValueError for a model without memory blocks or bad input_ids / window / batch_size.
    """
    from tqdm.auto import tqdm

    t0 = time.time()
    ev = _Evaluator(model, input_ids, window, batch_size, device)
    base = ev.loss(keep_inputs=True)
    blocks = _block_record(ev)
    jobs = [(j, p, h) for j, (p, m) in enumerate(ev.blocks) for h in list(range(m.num_heads)) + [None]]
    for rec in blocks:
        rec["loss_zeroed"] = [None] * rec["heads"]
    for j, p, h in tqdm(jobs, desc="head importance", disable=not progress, leave=False):
        heads = range(blocks[j]["heads"]) if h is None else [h]
        loss = ev.loss({p: zero_heads(heads)}, start=p)
        if h is None:
            blocks[j]["block_zeroed_loss"] = loss
            blocks[j]["block_zeroed_delta"] = loss - base
        else:
            blocks[j]["loss_zeroed"][h] = loss
    for rec in blocks:
        rec["delta"] = [v - base for v in rec["loss_zeroed"]]
    return {**_common(ev, "head_importance"), "loss": base, "blocks": blocks,
            "rule": "a head's k retrieval weights set to 0 (its read-out is exactly zero); only layers from "
                    "the block on are re-run, from the block's recorded input",
            "passes": ev.passes, "seconds": time.time() - t0}


# ----------------------------------------------------------------------------- fixed retrieval

_RULES = ("top", "first")
_WEIGHTINGS = ("uniform", "scores")


def _count_slots(ev: _Evaluator) -> Tuple[float, Dict[int, torch.Tensor], Dict[int, torch.Tensor]]:
    """One learned pass: its loss, per block the slot-read counts [H, n*n] and the first token's slots [H, k]."""
    counts = {p: torch.zeros(m.num_heads, m.n * m.n, dtype=torch.float64) for p, m in ev.blocks}
    first: Dict[int, torch.Tensor] = {}

    def recorder(p):
        def rec(idx, w):
            H, R = counts[p].shape
            flat = (idx.long().cpu() + torch.arange(H).view(1, H, 1) * R).reshape(-1)
            counts[p].view(-1).index_add_(0, flat, torch.ones(flat.numel(), dtype=torch.float64))
            if p not in first:
                first[p] = idx[0].long().cpu().clone()

        return rec

    loss = ev.loss(record={p: recorder(p) for p, _ in ev.blocks})
    return loss, counts, first


def fixed_slot_sets(counts: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` most-read slots per head: counts [H, R] -> [H, k] int64, most read first;
    ties go to the lower slot index (stable sort)."""
    order = torch.sort(counts, dim=-1, descending=True, stable=True).indices
    return order[:, :k].contiguous()


def _weights(weighting: str, memory: Memory, q: torch.Tensor, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if weighting == "uniform":
        return torch.full(idx.shape, 1.0 / idx.shape[-1], dtype=like.dtype, device=like.device)
    s = slot_scores(memory, q, idx)
    return memory.topk_weights(s).to(like.dtype)


def _fixed_select(memory: Memory, slots: torch.Tensor, weighting: str) -> Select:
    def select(q, scores, idx, w):
        fixed = slots.to(idx.device).unsqueeze(0).expand(idx.shape[0], -1, -1).to(idx.dtype)
        return fixed, _weights(weighting, memory, q, fixed, w)

    return select


def _random_select(memory: Memory, weighting: str, generator: torch.Generator) -> Select:
    def select(q, scores, idx, w):
        N, H, k = idx.shape
        # k distinct slots per (token, head), uniform over the n*n slots, from a seeded CPU generator.
        rand = torch.rand(N * H, memory.n * memory.n, generator=generator).topk(k, dim=-1).indices
        rand = rand.view(N, H, k).to(device=idx.device, dtype=idx.dtype)
        return rand, _weights(weighting, memory, q, rand, w)

    return select


def _learned_select(memory: Memory, weighting: str) -> Select:
    """The learned indices; weights as learned, uniform, or recomputed from scores (a check)."""
    def select(q, scores, idx, w):
        return idx, (w if weighting == "learned" else _weights(weighting, memory, q, idx, w))

    return select


def retrieval_loss(model, input_ids: torch.Tensor, slots: str = "learned", weighting: str = "learned",
                   fixed_slots: Optional[Dict[int, torch.Tensor]] = None, seed: int = 0,
                   window: int = DEFAULT_WINDOW, batch_size: int = 4, device=None) -> float:
    """Loss (nats/token) with every memory block's retrieval replaced.

    slots: "learned" (each token's own top-k), "fixed" (``fixed_slots[position]`` [H, k] int64 for
    every token) or "random" (k distinct uniform slots per token and head, torch.Generator seeded
    with ``seed``). weighting: "learned" (the token's softmax weights; with slots="learned" only),
    "uniform" (1/k) or "scores" (softmax(score / tau) of the token's product-key scores of those
    slots, :func:`slot_scores`). Raises ValueError for unknown values or missing fixed_slots.
    """
    ev = _Evaluator(model, input_ids, window, batch_size, device)
    return ev.loss(_selects(ev, slots, weighting, fixed_slots, seed))


def _selects(ev: _Evaluator, slots: str, weighting: str, fixed_slots, seed: int) -> Dict[int, Select]:
    if slots not in ("learned", "fixed", "random"):
        raise ValueError(f"slots must be 'learned', 'fixed' or 'random', got {slots!r}")
    allowed = ("learned",) + _WEIGHTINGS if slots == "learned" else _WEIGHTINGS
    if weighting not in allowed:
        raise ValueError(f"weighting must be one of {allowed} with slots={slots!r}, got {weighting!r}")
    if slots == "learned":
        return {p: _learned_select(m, weighting) for p, m in ev.blocks}
    if slots == "random":
        gen = torch.Generator().manual_seed(int(seed))
        return {p: _random_select(m, weighting, gen) for p, m in ev.blocks}
    missing = [p for p, _ in ev.blocks if fixed_slots is None or p not in fixed_slots]
    if missing:
        raise ValueError(f"fixed_slots must give a [H, k] slot set for every block position; missing {missing}")
    for p, m in ev.blocks:
        s = fixed_slots[p]
        if s.dim() != 2 or s.shape[0] != m.num_heads or not 1 <= s.shape[1] or \
                int(s.min()) < 0 or int(s.max()) >= m.n * m.n:
            raise ValueError(f"fixed_slots[{p}] must be [H={m.num_heads}, k] int64 in [0, {m.n * m.n}), "
                             f"got shape {tuple(s.shape)}")
    return {p: _fixed_select(m, fixed_slots[p].long(), weighting) for p, m in ev.blocks}


def fixed_retrieval(model, input_ids: torch.Tensor, rules: Sequence[str] = _RULES,
                    weightings: Sequence[str] = _WEIGHTINGS, seed: int = 0, window: int = DEFAULT_WINDOW,
                    batch_size: int = 4, device=None) -> dict:
    """The loss with retrieval replaced, in every memory block at once, against the learned one (docs/design.md §3.5).

    Variants (each one forward pass over the evaluation windows):

    - ``learned``: the model as it is.
    - ``fixed/<rule>/<weighting>``: per block and head one slot set S_h of k slots, the same for
      every token. rule "top": the k slots that head read most often over these evaluation tokens
      (learned retrieval; ties to the lower index); rule "first": the slots the first evaluation
      token read. weighting "uniform": 1/k each, so the head's read-out is one constant vector;
      "scores": softmax(score / tau) of the token's own product-key scores of S_h (the query still
      weighs the k fixed slots).
    - ``random/<weighting>``: k distinct slots per token and head drawn uniformly (seeded).
    - ``no_memory``: every head of every block zeroed (with out_proj="none", the base model).

    Returns a dict with ``losses`` {variant: nats/token}, ``delta`` {variant: loss - learned},
    ``fixed_slots`` {position: [H][k]} per rule, the rules in words, ``tokens``, ``seconds``.
    Raises ValueError for a model without memory blocks or unknown rules/weightings.
    """
    t0 = time.time()
    bad = [r for r in rules if r not in _RULES] + [w for w in weightings if w not in _WEIGHTINGS]
    if bad:
        raise ValueError(f"unknown rule/weighting {bad}; rules: {_RULES}, weightings: {_WEIGHTINGS}")
    ev = _Evaluator(model, input_ids, window, batch_size, device)
    learned, counts, first = _count_slots(ev)
    sets = {"top": {p: fixed_slot_sets(counts[p], m.k) for p, m in ev.blocks}, "first": first}
    losses = {"learned": learned}
    for rule in rules:
        for weighting in weightings:
            losses[f"fixed/{rule}/{weighting}"] = ev.loss(_selects(ev, "fixed", weighting, sets[rule], seed))
    for weighting in weightings:
        losses[f"random/{weighting}"] = ev.loss(_selects(ev, "random", weighting, None, seed))
    losses["no_memory"] = ev.loss({p: zero_heads(range(m.num_heads)) for p, m in ev.blocks})
    return {**_common(ev, "fixed_retrieval"), "losses": losses,
            "delta": {key: value - learned for key, value in losses.items()},
            "blocks": _block_record(ev),
            "fixed_slots": {rule: {str(p): sets[rule][p].tolist() for p, _ in ev.blocks} for rule in rules},
            "rules": {
                "top": "per head, the k slots read most often by the learned retrieval over these tokens "
                       "(ties: lower index)",
                "first": "per head, the k slots the first evaluation token reads",
                "uniform": "weights 1/k: the head reads one constant vector",
                "scores": "softmax(score / tau) of the token's product-key scores of the k given slots",
                "random": f"k distinct slots per token and head, uniform, torch.Generator seed {seed}",
                "no_memory": "every head of every block zeroed"},
            "seed": seed, "passes": ev.passes, "seconds": time.time() - t0}


# ----------------------------------------------------------------------------- memory usage


def memory_usage(model, input_ids: torch.Tensor, window: int = DEFAULT_WINDOW, batch_size: int = 4,
                 device=None) -> dict:
    """The usage statistics of docs/design.md §2.1 per block and head over the evaluation tokens.

    Runs the layers' own forward (eval mode, ``track_stats`` on) from reset statistics and reads
    each layer's ``memory_stats()``: ``slot_usage`` (fraction of the n*n slots read at least once),
    ``kl_from_uniform`` (nats; 0 = uniform use, log(n*n) = one slot), ``weight_entropy`` (mean
    entropy of the top-k softmax weights, nats; log k = uniform weights). The layers' previous
    statistics and ``track_stats`` are restored afterwards. Returns a dict with ``blocks`` (each
    with those three lists of H values, ``max_kl`` = log(n*n), ``max_entropy`` = log k), ``loss``,
    ``tokens``, ``seconds``. Raises ValueError for a model without memory blocks.
    """
    t0 = time.time()
    ev = _Evaluator(model, input_ids, window, batch_size, device)
    saved = []
    for _, m in ev.blocks:
        saved.append((m, m.track_stats, {name: b.clone() for name, b in m.named_buffers()}))
    try:
        for m, _, _ in saved:
            m.reset_memory_stats()
            m.track_stats = True
        loss = ev.loss(intervene=False)
        stats = [m.memory_stats() for _, m in ev.blocks]
    finally:
        for m, track, buffers in saved:
            m.track_stats = track
            own = dict(m.named_buffers())
            with torch.no_grad():
                for name, value in buffers.items():
                    own[name].copy_(value)
    blocks = _block_record(ev)
    for rec, st, (_, m) in zip(blocks, stats, ev.blocks):
        for key in ("slot_usage", "kl_from_uniform", "weight_entropy"):
            rec[key] = [_finite(v) for v in st[key].tolist()]
        rec["max_kl"] = math.log(m.n * m.n)
        rec["max_entropy"] = math.log(m.k)
    return {**_common(ev, "memory_usage"), "loss": loss, "blocks": blocks,
            "statistics": "Lample et al. 2019 sec. 4.3 via the layers' memory_stats() (docs/design.md §2.1)",
            "seconds": time.time() - t0}


def retrieval_gain_words(gain: float) -> str:
    """``memory_health``'s ``retrieval_gain`` (random-slot loss minus learned loss, nats) in words
    that stay true when it is negative."""
    if gain > 0:
        return f"learned retrieval beats random slots by {gain:.3f} nats"
    return f"learned retrieval does not beat random slots (random minus learned: {gain:.3f} nats)"


def memory_health(model, input_ids: torch.Tensor, window: int = DEFAULT_WINDOW, batch_size: int = 4, seed: int = 0,
                  device=None) -> dict:
    """Whether the memory learned, in three figures (what ``midus run`` prints after CPT).

    Two passes over the evaluation windows: the layers' own forward with usage statistics
    (:func:`memory_usage`), then every block reading k random slots per token and head with
    uniform weights (:func:`retrieval_loss`, slots="random", weighting="uniform", seeded).

    Returns a dict: ``weight_entropy`` (mean over blocks and heads of the top-k weight entropy,
    nats), ``max_entropy`` (ln k: uniform weights), ``entropy_ratio`` (their ratio; 1 = the
    memory reads its k slots alike, so it acts as a bias rather than as retrieval),
    ``slot_usage`` (mean fraction of the n*n slots read), ``learned_loss`` and ``random_loss``
    (nats/token), ``retrieval_gain`` (random - learned, nats: how much the learned choice of
    slots and weights is worth), ``tokens``, ``seconds``. Raises ValueError for a model without
    memory blocks.
    """
    t0 = time.time()
    usage = memory_usage(model, input_ids, window, batch_size, device)
    ev = _Evaluator(model, input_ids, window, batch_size, device)
    random_loss = ev.loss(_selects(ev, "random", "uniform", None, seed))
    values = lambda key: [v for b in usage["blocks"] for v in b[key] if v is not None]  # noqa: E731
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    ent, max_ent = mean(values("weight_entropy")), mean([b["max_entropy"] for b in usage["blocks"]])
    return {"weight_entropy": ent, "max_entropy": max_ent, "entropy_ratio": ent / max_ent if max_ent > 0 else None,
            "slot_usage": mean(values("slot_usage")), "learned_loss": usage["loss"], "random_loss": random_loss,
            "retrieval_gain": random_loss - usage["loss"], "tokens": usage["tokens"], "window": usage["window"],
            "seed": seed, "seconds": time.time() - t0}


def _finite(v: float) -> Optional[float]:
    return v if math.isfinite(v) else None  # strict JSON has no NaN


# ----------------------------------------------------------------------------- figures


def _figure(**kwargs):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    return Figure(**kwargs)


def _grid(result: dict, key: str) -> torch.Tensor:
    H = max(b["heads"] for b in result["blocks"])
    g = torch.full((len(result["blocks"]), H), float("nan"), dtype=torch.float64)
    for i, b in enumerate(result["blocks"]):
        vals = [float("nan") if v is None else v for v in b[key]]
        g[i, :len(vals)] = torch.tensor(vals, dtype=torch.float64)
    return g


def _heatmap(fig, ax, grid: torch.Tensor, result: dict, title: str, label: str, cmap: str, symmetric: bool,
             fmt: str, vmin=None, vmax=None):
    data = grid.numpy()
    if symmetric:
        finite = grid[torch.isfinite(grid)]
        lim = float(finite.abs().max()) if finite.numel() else 0.0
        vmin, vmax = -(lim or 1e-12), (lim or 1e-12)
    im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(grid.shape[0]))
    ax.set_yticklabels([f"{b['block']} (layer {b['position']})" for b in result["blocks"]])
    ax.set_xlabel("head" if result["blocks"][0]["kind"] == "hml" else "memory head (PKM)")
    ax.set_ylabel("memory block")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=label)
    if grid.numel() <= 400:
        for (i, j), v in _cells(grid):
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=6)


def _cells(grid: torch.Tensor):
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = float(grid[i, j])
            if math.isfinite(v):
                yield (i, j), v


def plot_head_importance(result: dict, path) -> str:
    """Heat map block x head of the loss increase (nats) when a head's read-out is zeroed, and a
    bar per block for zeroing the whole block. Writes ``path`` (PNG); returns it."""
    grid = _grid(result, "delta")
    fig = _figure(figsize=(4 + 0.55 * grid.shape[1] + 3, 1.5 + 0.45 * grid.shape[0]), layout="constrained")
    ax, bx = fig.subplots(1, 2, width_ratios=[max(grid.shape[1], 2), 3])
    _heatmap(fig, ax, grid, result, f"head importance: loss increase when one head is zeroed\n"
             f"(learned loss {result['loss']:.4f} nats, {result['tokens']} tokens)", "delta loss (nats)",
             "RdBu_r", True, ".4f")
    deltas = [b.get("block_zeroed_delta", float("nan")) for b in result["blocks"]]
    bx.barh(range(len(deltas)), deltas, color="tab:red")
    bx.set_yticks(range(len(deltas)))
    bx.set_yticklabels([str(b["block"]) for b in result["blocks"]])
    bx.invert_yaxis()
    bx.axvline(0, color="black", lw=0.5)
    bx.set_xlabel("delta loss (nats)")
    bx.set_title("whole block zeroed", fontsize=10)
    fig.savefig(path, dpi=120)
    return str(path)


def plot_fixed_retrieval(result: dict, path) -> str:
    """Bar chart of the loss of each retrieval variant, with the learned loss as a line. Writes ``path``."""
    names = list(result["losses"])
    values = [result["losses"][n] for n in names]
    colors = ["tab:green" if n == "learned" else "tab:gray" if n == "no_memory" else
              "tab:orange" if n.startswith("random") else "tab:blue" for n in names]
    fig = _figure(figsize=(1.6 + 1.1 * len(names), 4.2), layout="constrained")
    ax = fig.subplots()
    bars = ax.bar(range(len(names)), values, color=colors)
    ax.axhline(result["losses"]["learned"], color="tab:green", ls="--", lw=1)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("loss (nats / token)")
    lo, hi = min(values), max(values)
    pad = max(hi - lo, 1e-3)
    ax.set_ylim(lo - 0.5 * pad, hi + 0.3 * pad)  # differences are small next to the loss itself
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.4f}", ha="center", va="bottom", fontsize=7)
    ax.set_title(f"fixed vs random vs learned retrieval, all {len(result['blocks'])} memory blocks\n"
                 f"({result['tokens']} tokens)", fontsize=10)
    fig.savefig(path, dpi=120)
    return str(path)


def plot_memory_usage(result: dict, path) -> str:
    """Three heat maps block x head: fraction of slots read, KL from uniform, top-k weight entropy. Writes ``path``."""
    H = max(b["heads"] for b in result["blocks"])
    K = len(result["blocks"])
    fig = _figure(figsize=(3 * (2 + 0.5 * H), 1.8 + 0.45 * K), layout="constrained")
    axes = fig.subplots(1, 3)
    b0 = result["blocks"][0]
    panels = [("slot_usage", "fraction of the n*n slots read", "viridis", ".2f", 0.0, 1.0),
              ("kl_from_uniform", f"KL from uniform (nats, max {b0['max_kl']:.2f})", "magma", ".2f", 0.0,
               b0["max_kl"]),
              ("weight_entropy", f"top-k weight entropy (nats, max {b0['max_entropy']:.2f})", "cividis", ".2f", 0.0,
               b0["max_entropy"])]
    for ax, (key, label, cmap, fmt, vmin, vmax) in zip(axes, panels):
        _heatmap(fig, ax, _grid(result, key), result, label, "fraction" if key == "slot_usage" else "nats", cmap,
                 False, fmt, vmin, vmax)
    fig.suptitle(f"memory usage over {result['tokens']} tokens", fontsize=10)
    fig.savefig(path, dpi=120)
    return str(path)


_PLOTS = {"heads": plot_head_importance, "fixed": plot_fixed_retrieval, "usage": plot_memory_usage}


def run_analyses(model, input_ids: torch.Tensor, out_dir, analyses: Sequence[str] = ANALYSES,
                 window: int = DEFAULT_WINDOW, batch_size: int = 4, seed: int = 0, device=None,
                 progress: bool = False) -> dict:
    """Run the chosen analyses ("heads", "fixed", "usage") and write ``head_importance``,
    ``fixed_retrieval``, ``memory_usage`` ``.json`` + ``.png`` into ``out_dir`` (created).

    Returns {analysis: result dict with ``json`` and ``figure`` paths added}. Raises ValueError
    for unknown analysis names or a model without memory blocks (before any pass is run).
    """
    analyses = list(dict.fromkeys(analyses))
    unknown = [a for a in analyses if a not in ANALYSES]
    if unknown or not analyses:
        raise ValueError(f"analyses must be a non-empty subset of {ANALYSES}, got {analyses}")
    memory_blocks(model)  # refuse early
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in analyses:
        if name == "heads":
            res = head_importance(model, input_ids, window, batch_size, device, progress)
        elif name == "fixed":
            res = fixed_retrieval(model, input_ids, seed=seed, window=window, batch_size=batch_size, device=device)
        else:
            res = memory_usage(model, input_ids, window, batch_size, device)
        stem = out / _FILE_NAMES[name]
        res["json"], res["figure"] = str(stem.with_suffix(".json")), str(stem.with_suffix(".png"))
        Path(res["json"]).write_text(json.dumps(res, indent=2, allow_nan=False) + "\n")
        _PLOTS[name](res, res["figure"])
        results[name] = res
    return results


# ----------------------------------------------------------------------------- the subcommand


def add_arguments(parser) -> None:
    """The options of ``midus analyze`` (an ``argparse`` (sub)parser)."""
    from .runtime import add_data_arguments

    parser.add_argument("--model", required=True,
                        help="a MIDUS model folder (from `midus upscale`/`midus train`, or `midus run --output`)")
    parser.add_argument("--analyses", default=",".join(ANALYSES),
                        help=f"comma-separated subset of {','.join(ANALYSES)} (default: all)")
    parser.add_argument("--output", default="midus-analysis",
                        help="folder for the JSON files and figures (created; default: midus-analysis)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                        help=f"evaluation tokens, the first N of the split (default: {DEFAULT_TOKENS}; head "
                             f"importance runs K*(H+1) partial passes over them: about 2 min in all for SmolLM2 "
                             f"with 8 blocks on 2 idle CPU cores)")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                        help=f"tokens per evaluation window (default: {DEFAULT_WINDOW})")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-slot retrieval (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_data_arguments(parser, "documents to evaluate on (default: val for wiki, all otherwise)")


def run(args) -> int:
    """``midus analyze``: load ``--model``, take ``--tokens`` tokens of ``--data``, run the analyses,
    write them to ``--output`` and print a summary. Errors (bad path, no memory blocks, bad
    values) raise CLIError / ValueError naming the argument, for ``midus.cli.main`` to print."""
    from .runtime import UsageError as CLIError
    from .runtime import eval_split, load_model, pick_device
    from .data import load_corpus

    analyses = [a.strip() for a in args.analyses.split(",") if a.strip()]
    bad = [a for a in analyses if a not in ANALYSES]
    if bad or not analyses:
        raise CLIError(f"--analyses: expected a comma-separated subset of {','.join(ANALYSES)}, got {args.analyses!r}")
    for name in ("tokens", "window", "batch_size"):
        if getattr(args, name) < (2 if name != "batch_size" else 1):
            raise CLIError(f"--{name.replace('_', '-')}: must be positive (>= 2 for tokens and window), "
                           f"got {getattr(args, name)}")
    if args.tokens < args.window:
        raise CLIError(f"--tokens {args.tokens} is less than one --window of {args.window}")
    out = Path(args.output).expanduser()
    for parent in [out] + list(out.parents):  # fail before the work, not when writing its results
        if parent.exists():
            if not parent.is_dir():
                raise CLIError(f"--output: {parent} exists and is not a folder")
            break
    device = pick_device("auto")
    model, tokenizer, path = load_model(args.model, device)
    memory_blocks(model)  # refuse a model without memory blocks before reading data
    ids = load_corpus(args.data, tokenizer, split=eval_split(args.data, args.split), val_fraction=args.val_fraction,
                      max_tokens=args.tokens)
    if ids.numel() < args.window:
        raise CLIError(f"--data: only {ids.numel()} tokens, fewer than one --window of {args.window}")
    t0 = time.time()
    results = run_analyses(model, ids, args.output, analyses, window=args.window, batch_size=args.batch_size,
                           seed=args.seed, device=device, progress=not args.no_progress)
    print(f"midus analyze: {path}, {len(memory_blocks(model))} memory blocks, "
          f"{next(iter(results.values()))['tokens']} scored tokens of {args.data}; {time.time() - t0:.1f} s")
    if "heads" in results:
        r = results["heads"]
        top = max(((b["delta"][h], b["block"], h) for b in r["blocks"] for h in range(b["heads"])))
        print(f"  head importance: learned loss {r['loss']:.4f}; largest increase {top[0]:+.4f} nats "
              f"(block {top[1]}, head {top[2]}); {r['seconds']:.1f} s")
    if "fixed" in results:
        r = results["fixed"]
        print("  fixed retrieval: " + ", ".join(f"{k} {v:.4f}" for k, v in r["losses"].items()))
    if "usage" in results:
        r = results["usage"]
        mean = lambda key: sum(v for b in r["blocks"] for v in b[key] if v is not None) / max(  # noqa: E731
            1, sum(v is not None for b in r["blocks"] for v in b[key]))
        print(f"  memory usage: mean slots read {mean('slot_usage'):.3f}, KL from uniform "
              f"{mean('kl_from_uniform'):.3f} nats, weight entropy {mean('weight_entropy'):.3f} nats")
    for r in results.values():
        print(f"  wrote {r['json']} and {r['figure']}")
    return 0
