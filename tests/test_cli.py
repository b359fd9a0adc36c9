"""The midus command: help, upscale, train (+ resume), eval, run; atomic outputs and clear errors
(issue 3 item 7)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import midus
from midus.cli import main

# Subprocesses import the same midus as this process: the installed one, or the source tree.
MIDUS_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(midus.__file__)))
TINY_MEM = ["--n", "8", "--k", "4", "--d-z", "16"]


def snapshot(folder):
    """{relative path: bytes} of every file under folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out


@pytest.mark.parametrize("command", [[], ["upscale"], ["train"], ["eval"], ["run"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(command + ["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: midus")
    for flag in {"upscale": ["--method", "--num-blocks", "--output"], "train": ["--resume", "--trainable", "--steps"],
                 "eval": ["--stride", "--window"], "run": ["--eval-tokens", "--time-budget"]}.get(
            command[0] if command else "", ["upscale", "train", "eval", "run"]):
        assert flag in out


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "midus", "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": MIDUS_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert res.returncode == 0 and "{upscale,train,eval,run," in res.stdout


def test_upscale_writes_a_loadable_folder(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "up"
    assert main(["upscale", "--model", tiny_model_dir, "--output", str(out), "--num-blocks", "2"] + TINY_MEM) == 0
    assert "wrote" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, midus.MidusForCausalLM) and len(model.model.layers) == 6
    assert model.config.midus_upscale["method"] == "midus"
    AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():  # identity at insertion (zero bank): same logits as the base
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temp folders left


def test_upscale_needs_a_tokenizer_only_for_importance_placement(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    bare = tmp_path / "bare"  # weights and config only, as many published conversions are
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(bare)
    out = tmp_path / "up"
    assert main(["upscale", "--model", str(bare), "--output", str(out), "--num-blocks", "2"] + TINY_MEM) == 0
    assert "holds no tokenizer" in capsys.readouterr().err
    assert isinstance(AutoModelForCausalLM.from_pretrained(out), midus.MidusForCausalLM)
    assert not (out / "tokenizer.json").exists()
    code = main(["upscale", "--model", str(bare), "--output", str(tmp_path / "imp"), "--num-blocks", "2",
                 "--placement", "importance", "--data", tiny_text_file] + TINY_MEM)
    assert code == 1 and "cannot load a tokenizer" in capsys.readouterr().err


def test_failed_commands_leave_existing_output_unchanged(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch,
                                                         capsys):
    import shutil

    out = tmp_path / "out"  # an earlier output (a model folder), which a failed run must keep
    shutil.copytree(tiny_model_dir, out)
    before = snapshot(out)
    # upscale fails inside the output block (K > L is rejected by midus.upscale).
    rc = main(["upscale", "--model", tiny_model_dir, "--output", str(out), "--num-blocks", "99"] + TINY_MEM)
    assert rc == 1 and "num_blocks" in capsys.readouterr().err
    assert snapshot(out) == before
    # train fails while writing its result (after the model files went to the temp folder).
    import transformers

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", boom)
    with pytest.raises(OSError, match="simulated"):
        main(["train", "--model", tiny_model_dir, "--data", tiny_text_file, "--output", str(out), "--steps", "1",
              "--seq-len", "16", "--batch-size", "2", "--no-progress"])
    assert snapshot(out) == before
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []


def test_output_that_is_not_a_model_folder_is_refused_not_replaced(tiny_model_dir, tmp_path, monkeypatch, capsys):
    # --output is replaced whole on success, so a folder of other files, the working folder and
    # its parents are refused up front and left exactly as they were.
    notes = tmp_path / "project"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    monkeypatch.chdir(notes)
    for output in [str(notes), ".", str(tmp_path)]:
        before = snapshot(notes)
        rc = main(["upscale", "--model", tiny_model_dir, "--output", output, "--num-blocks", "1"] + TINY_MEM)
        assert rc == 1 and "--output" in capsys.readouterr().err
        assert snapshot(notes) == before


def test_model_folder_holding_user_files_is_refused_not_replaced(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    # A model folder may be replaced (a re-run), but not one where the user keeps other things:
    # notes, an analysis subfolder, or a config.json that is not a model's.
    import shutil

    cases = {"notes": ["notes.txt"], "subfolder": ["analysis/"], "not_a_model_config": []}
    for name, extra in cases.items():
        out = tmp_path / name
        shutil.copytree(tiny_model_dir, out)
        for item in extra:
            if item.endswith("/"):
                (out / item).mkdir()
                (out / item / "head_importance.json").write_text("{}")
            else:
                (out / item).write_text("precious")
        if name == "not_a_model_config":
            (out / "config.json").write_text('{"mine": 1}')
        before = snapshot(out)
        for argv in (["upscale", "--model", tiny_model_dir, "--output", str(out), "--num-blocks", "1"] + TINY_MEM,
                     ["train", "--model", tiny_model_dir, "--data", tiny_text_file, "--output", str(out), "--steps",
                      "1", "--seq-len", "16", "--batch-size", "2", "--no-progress"]):
            assert main(argv) == 1
            err = capsys.readouterr().err
            assert "--output" in err and "Traceback" not in err, err
            assert snapshot(out) == before, (name, argv[0])


@pytest.mark.parametrize("command", [["upscale", "--output", "X"], ["train", "--output", "X"], ["eval"], ["run"]])
def test_missing_model_path_is_a_clear_error(command, tmp_path, capsys):
    missing = str(tmp_path / "no_such_model")
    argv = [command[0], "--model", missing] + [str(tmp_path / a) if a == "X" else a for a in command[1:]]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert missing in err and "not found" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "X")


def test_train_resume_and_eval(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    up = tmp_path / "up"
    assert main(["upscale", "--model", tiny_model_dir, "--output", str(up), "--num-blocks", "2"] + TINY_MEM) == 0
    out, ckpt = tmp_path / "trained", tmp_path / "ckpt"
    common = ["train", "--model", str(up), "--data", tiny_text_file, "--output", str(out), "--checkpoint-dir",
              str(ckpt), "--seq-len", "16", "--batch-size", "2", "--lr", "1e-2", "--warmup", "1", "--no-progress"]
    assert main(common + ["--steps", "2", "--save-every", "1"]) == 0
    log = [json.loads(x) for x in open(out / "train_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2] and {"loss", "lr", "tokens_per_s"} <= set(log[0])
    assert sorted(os.listdir(ckpt)) == ["checkpoint-1", "checkpoint-2", "log.jsonl"]
    # Resume the latest checkpoint and continue to step 4.
    assert main(common + ["--steps", "4", "--resume"]) == 0
    log = [json.loads(x) for x in open(ckpt / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    trained = AutoModelForCausalLM.from_pretrained(out)
    untrained = AutoModelForCausalLM.from_pretrained(up)
    bank = "model.layers.2.memory.bank"
    assert not torch.equal(trained.state_dict()[bank], untrained.state_dict()[bank])
    capsys.readouterr()

    assert main(["eval", "--model", str(up), "--model", str(out), "--data", tiny_text_file, "--window", "32",
                 "--stride", "16", "--max-tokens", "1024", "--json", "--no-progress"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == [str(up), str(out)]
    assert rows[0]["tokens"] == rows[1]["tokens"] > 0
    assert rows[1]["ppl"] < rows[0]["ppl"]  # training on this text lowers its perplexity
    # --tasks none means no tasks, as in midus compare
    assert main(["eval", "--model", str(out), "--data", tiny_text_file, "--window", "32", "--stride", "16",
                 "--max-tokens", "1024", "--json", "--no-progress", "--tasks", "none"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["ppl"] == rows[1]["ppl"]


def test_run_smoke_on_the_default_model(tmp_path, capsys):
    """`midus run` end to end on the real SmolLM2-135M at tiny settings (fetched on first use)."""
    report = tmp_path / "run.json"
    rc = main(["run", "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--eval-tokens", "96", "--window", "32",
               "--num-blocks", "2", "--n", "8", "--k", "4", "--d-z", "32", "--no-progress", "--json", str(report)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "base" in out and "after CPT" in out and "train tokens/s" in out and "wall time" in out
    r = json.loads(report.read_text())
    assert r["params_added"] > 0 and r["params_upscaled"] == r["params_base"] + r["params_added"]
    assert 1 < r["ppl_base"] < 1000
    assert r["ppl_before"] == pytest.approx(r["ppl_base"], rel=1e-4)  # identity at insertion
    assert r["train_steps"] == 2 and r["train_tokens"] == 2 * 2 * 32 and r["train_tokens_per_s"] > 0


def test_explicit_placement_sets_the_number_of_blocks(tiny_model_dir, tmp_path):
    out = tmp_path / "placed"
    assert main(["upscale", "--model", tiny_model_dir, "--output", str(out), "--placement", "0,2"] + TINY_MEM) == 0
    import json
    record = json.loads((out / "config.json").read_text())["midus_upscale"]
    assert record["num_blocks"] == 2 and record["base_layers"] == [0, 2]


def test_lesa_flags_reach_upscale_and_are_recorded(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "lesa"
    assert main(["upscale", "--model", tiny_model_dir, "--output", str(out), "--method", "lesa", "--num-blocks", "1",
                 "--lesa-rank", "4", "--lesa-epochs", "1", "--lesa-last", "copy"]) == 0
    record = json.loads((out / "config.json").read_text())["midus_upscale"]
    assert record["method"] == "lesa"
    assert {k: record["lesa_options"][k] for k in ("rank", "epochs", "last")} == {"rank": 4, "epochs": 1, "last": "copy"}
    assert "lesa: fitting the predictor" in capsys.readouterr().err
    assert main(["upscale", "--model", tiny_model_dir, "--output", str(tmp_path / "x"), "--method", "dus",
                 "--num-blocks", "1", "--lesa-rank", "4"]) == 1
    assert "--lesa-rank" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_deus_flags_reach_upscale_and_are_recorded(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "opt"
    assert main(["upscale", "--model", tiny_model_dir, "--output", str(out), "--method", "opt_deus", "--num-blocks",
                 "2", "--ot-reg", "0.05", "--ot-max-iter", "200"]) == 0
    record = json.loads((out / "config.json").read_text())["midus_upscale"]
    assert record["placement"] == "top-gaps" and record["base_layers"] == [1, 2]  # the method's default
    assert record["deus_options"] == {"reg": 0.05, "max_iter": 200, "identity": True}
    assert "after base layers [1, 2]" in capsys.readouterr().out
    out = tmp_path / "avg"
    assert main(["upscale", "--model", tiny_model_dir, "--output", str(out), "--method", "avg_deus", "--num-blocks",
                 "1", "--keep-writers"]) == 0
    record = json.loads((out / "config.json").read_text())["midus_upscale"]
    assert record["placement"] == "distributed" and record["deus_options"] == {"identity": False}
    assert main(["upscale", "--model", tiny_model_dir, "--output", str(tmp_path / "x"), "--method", "avg_deus",
                 "--num-blocks", "1", "--ot-reg", "0.1"]) == 1
    assert "--ot-reg" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_sigterm_while_writing_an_output_leaves_no_temp_folder(tmp_path):
    """A kill (SIGTERM: a scheduler, `timeout`) while a command writes its output removes the hidden
    temp folder and leaves the earlier output as it was."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text('{"model_type": "llama"}')
    code = ("import os, signal, sys, time\nfrom midus.runtime import atomic_output_dir\n"
            "with atomic_output_dir(sys.argv[1]) as tmp:\n"
            "    (tmp / 'config.json').write_text('new')\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(30)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 128 + 15, proc.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert (tmp_path / "out" / "config.json").read_text() == '{"model_type": "llama"}'
