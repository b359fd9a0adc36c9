"""midus.evaluate: sliding-window perplexity scores every token exactly once (issue 3 item 5)."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_llama
from midus.evaluate import perplexity, sliding_windows

VOCAB = 96


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(VOCAB, seed=1)


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (77,), generator=g)


def _direct_nll(model, seq):
    """Sum of next-token NLL over a sequence, computed in one forward with the model's own loss."""
    with torch.no_grad():
        loss = model(input_ids=seq[None], labels=seq[None]).loss
    return float(loss) * (seq.numel() - 1), seq.numel() - 1


@pytest.mark.parametrize("length,window,stride", [(77, 16, 16), (77, 16, 5), (77, 16, 1), (10, 16, 4),
                                                  (100, 7, 3), (2, 2, 1), (50, 10, 9), (64, 16, 16)])
def test_each_token_scored_once(length, window, stride):
    scored = []
    for begin, end, first in sliding_windows(length, window, stride):
        assert 0 <= begin < first < end <= length and end - begin <= window
        scored.extend(range(first, end))
    assert len(scored) == len(set(scored))  # never twice
    if stride < window:
        assert sorted(scored) == list(range(1, length))  # every token but the first: len - 1
    else:  # disjoint chunks: each chunk's first token has no context inside its chunk
        starts = set(range(0, length, window))
        assert sorted(scored) == [t for t in range(length) if t not in starts]


def test_bad_arguments():
    with pytest.raises(ValueError, match="stride"):
        list(sliding_windows(10, 4, 5))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        list(sliding_windows(1, 4, 2))


def test_stride_equal_window_matches_disjoint_chunks(model, ids):
    W = 16
    total, count = 0.0, 0
    for b in range(0, ids.numel(), W):
        chunk = ids[b:b + W]
        if chunk.numel() >= 2:
            s, c = _direct_nll(model, chunk)
            total, count = total + s, count + c
    r = perplexity(model, ids, window=W, stride=W, batch_size=3)
    assert r.tokens == count == ids.numel() - math.ceil(ids.numel() / W)
    assert r.nll == pytest.approx(total / count, rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_stride_one_matches_per_token_brute_force(model, ids):
    """stride=1: token t is scored with exactly the W-1 tokens before it (fewer at the start)."""
    W, seq = 8, ids[:30]
    nll = 0.0
    with torch.no_grad():
        for t in range(1, seq.numel()):
            ctx = seq[max(0, t - W + 1):t + 1]
            logits = model(input_ids=ctx[None]).logits[0, -2].float()
            nll += float(F.cross_entropy(logits[None], seq[t:t + 1]))
    r = perplexity(model, seq, window=W, stride=1, batch_size=4)
    assert r.tokens == seq.numel() - 1
    assert r.nll == pytest.approx(nll / (seq.numel() - 1), rel=1e-5)


def test_one_window_equals_full_sequence(model, ids):
    total, count = _direct_nll(model, ids)
    for stride in (1, 13, 128):
        r = perplexity(model, ids, window=128, stride=stride)
        assert r.tokens == count and r.nll == pytest.approx(total / count, rel=1e-5)


def test_batching_and_mode_do_not_change_the_result(model, ids):
    model.train()
    a = perplexity(model, ids, window=16, stride=6, batch_size=1)
    assert model.training  # mode restored
    model.eval()
    b = perplexity(model, ids, window=16, stride=6, batch_size=5)
    assert a.tokens == b.tokens == ids.numel() - 1
    assert a.nll == pytest.approx(b.nll, rel=1e-5)
    # Default stride is window // 2; more context (smaller stride) does not change the count.
    assert perplexity(model, ids, window=16).tokens == ids.numel() - 1


def test_window_longer_than_the_context_is_an_error():
    model = make_tiny_llama(64)  # max_position_embeddings=512
    with pytest.raises(ValueError, match="window=1000 exceeds"):
        perplexity(model, torch.randint(0, 64, (2000,)), window=1000)
