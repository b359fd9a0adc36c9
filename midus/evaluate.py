"""Perplexity of a causal LM on held-out text with a sliding window (docs/design.md §3.4: the paper
reports WikiText perplexity).

Windows of ``window`` tokens start every ``stride`` tokens. Every token of the stream except the
first is scored exactly once, by the first window that contains it with at least one token of
context inside the window, and never again; so with ``stride < window`` each scored token sees at
least ``window - stride`` tokens of context, and the count of scored tokens is ``len - 1``. With
``stride == window`` the windows are disjoint chunks and each chunk's first token has no context
in its chunk, so it is not scored (count ``len - number_of_chunks``). This is the recipe of the
Hugging Face perplexity guide, made exact (sums of per-token NLL, not means of means).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterator, List, Tuple

import torch
import torch.nn.functional as F

__all__ = ["PerplexityResult", "sliding_windows", "perplexity"]


@dataclass
class PerplexityResult:
    """``ppl`` = exp(``nll``); ``nll`` mean negative log-likelihood per scored token (nats);
    ``tokens`` number of scored tokens; ``windows`` forward windows run; ``seconds`` wall time."""
    ppl: float
    nll: float
    tokens: int
    windows: int
    seconds: float = 0.0


def sliding_windows(length: int, window: int, stride: int) -> Iterator[Tuple[int, int, int]]:
    """Yield ``(begin, end, first_scored)``: the window is tokens [begin, end) and the targets
    scored in it are tokens [first_scored, end), each predicted from the logits one position
    before. Raises ValueError unless ``length >= 2`` and ``1 <= stride <= window``."""
    if length < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {length}")
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must satisfy 1 <= stride <= window = {window}, got {stride}")
    prev_end = 0
    for begin in range(0, length, stride):
        end = min(begin + window, length)
        first = max(prev_end, begin + 1)
        if first < end:
            yield begin, end, first
        prev_end = end
        if end == length:
            break


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int = 512, stride: int = 0, batch_size: int = 4,
               device=None, autocast_dtype=None, progress: bool = False) -> PerplexityResult:
    """Sliding-window perplexity of ``model`` on the token stream ``ids``.

    Args:
        model: a causal LM returning ``.logits`` [B, T, vocab] for ``input_ids`` [B, T].
        ids: 1-D int64 token stream (e.g. :func:`midus.data.load_corpus` with split="val").
        window: tokens per forward pass (at most the model's context).
        stride: start-to-start distance of windows; 0 means ``window // 2``. ``stride == window``
            gives disjoint chunks.
        batch_size: windows per forward pass (windows of equal length are batched).
        device: where to run; default the model's device.
        autocast_dtype: e.g. torch.bfloat16 to run under autocast (GPU); None for the model dtype.
        progress: show a tqdm bar.

    Returns a :class:`PerplexityResult`. The NLL is accumulated in float64 from fp32 log-softmax.
    The model is put in eval mode for the call and restored after. Raises ValueError for a
    stream shorter than 2 tokens or a bad window/stride.
    """
    import time

    from tqdm.auto import tqdm

    if ids.dim() != 1:
        raise ValueError(f"ids must be a 1-D token stream, got shape {tuple(ids.shape)}")
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if context is not None and window > context:
        raise ValueError(f"window={window} exceeds the model's context (max_position_embeddings={context})")
    stride = stride or max(1, window // 2)
    spans = list(sliding_windows(ids.numel(), window, stride))
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    t0 = time.time()
    nll_sum, count = 0.0, 0
    # Group windows of equal length so each batch is one rectangular tensor.
    groups: List[List[Tuple[int, int, int]]] = []
    for span in spans:
        if groups and len(groups[-1]) < batch_size and groups[-1][0][1] - groups[-1][0][0] == span[1] - span[0]:
            groups[-1].append(span)
        else:
            groups.append([span])
    ctx = torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    try:
        for group in tqdm(groups, desc="perplexity", disable=not progress, leave=False):
            x = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
            with ctx:
                logits = model(input_ids=x, use_cache=False).logits
            logp_all = []
            for row, (b, e, first) in enumerate(group):
                # logits at window position p predict token b + p + 1
                lg = logits[row, first - b - 1: e - b - 1].float()
                tgt = x[row, first - b: e - b]
                logp_all.append(F.cross_entropy(lg, tgt, reduction="sum").double())
                count += e - first
            nll_sum += float(torch.stack(logp_all).sum())
    finally:
        model.train(was_training)
    nll = nll_sum / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=count, windows=len(spans), seconds=time.time() - t0)
