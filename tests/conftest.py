# The public ops use the CUDA kernels only with MIDUS_OPS_CUDA_KERNELS=1 until a GPU run has
# validated them; the tests always exercise them where a GPU is present (set before midus_ops loads).
import os as _os

_os.environ.setdefault("MIDUS_OPS_CUDA_KERNELS", "1")


# ---- shared fixtures ----
import pytest as _pytest_shared  # noqa: E402


@_pytest_shared.fixture(autouse=True)
def _compiled_extension_present(request):
    """Tests marked ``kernels`` check the compiled kernels: they fail, saying why, when the
    extension is missing, unless MIDUS_TEST_ALLOW_FALLBACK=1 (see op_testing.py)."""
    if request.node.get_closest_marker("kernels") is None:
        return
    import midus_ops
    from op_testing import fallback_allowed, missing_extension_message

    if not midus_ops.EXTENSION_AVAILABLE and not fallback_allowed():
        _pytest_shared.fail(missing_extension_message(), pytrace=False)


@_pytest_shared.fixture(params=["reference", "kernel"])
def impl(request, monkeypatch):
    """The public ops (and the layers) on the reference, as without a compiled kernel (the
    fallback, and CUDA by default today), or on the compiled kernels: each test runs on both."""
    import midus_ops.ops as ops_mod
    from op_testing import require_extension

    if request.param == "reference":
        monkeypatch.setattr(ops_mod, "_KERNELS", {})
    else:
        require_extension()
    return request.param


@_pytest_shared.fixture(scope="module")
def one_thread():
    """Small models run fastest on one torch thread, and do not stall when the CPUs are shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# ---- BEGIN data/train/eval/cli fixtures (midus.data, midus.train, midus.evaluate, midus.cli) ----
import warnings as _warnings

import pytest as _pytest

_warnings.filterwarnings("ignore", message=".*midus_ops.*")

TINY_TEXT = "\n\n".join(
    f"Paragraph {i}. The quick brown fox number {i} jumps over the lazy dog while the river keeps flowing "
    f"past the old mill; counting {i * 7 % 13} stones, it rests and then runs on towards hill {i % 5}."
    for i in range(60))


def make_tiny_tokenizer():
    """A byte-level BPE tokenizer (about 300 tokens) trained in memory: no network, no files."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TINY_TEXT], vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_tiny_llama(vocab_size, seed=0, layers=4):
    """A random Llama: d=64, 4 heads (2 KV), ``layers`` layers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=0, bos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@_pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@_pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny Llama + tokenizer folder (loadable with from_pretrained)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


@_pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return str(path)
# ---- END data/train/eval/cli fixtures ----


def logits_without_midus(folder, input_ids, tmp_path):
    """Logits of the model saved in ``folder`` computed in a fresh process that loads it with
    ``trust_remote_code=True`` and never imports midus (asserted there)."""
    import subprocess
    import sys

    import torch

    torch.save(input_ids, tmp_path / "x.pt")
    code = ("import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
            "assert 'midus' not in sys.modules, 'midus was imported'\n"
            "with torch.no_grad():\n    torch.save(m(input_ids=torch.load(sys.argv[2])).logits, sys.argv[3])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          capture_output=True, text=True, cwd=str(tmp_path), timeout=300,
                          env=dict(_os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "y.pt")
