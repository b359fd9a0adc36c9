"""`midus compare` (midus.compare) on a tiny Llama: rows, same token budget, report files, errors."""
import argparse
import json

import pytest

from midus import compare as cmp


def _args(model_dir, text_file, out, *extra):
    p = argparse.ArgumentParser()
    cmp.add_arguments(p)
    return p.parse_args(["--model", model_dir, "--data", text_file, "--val-fraction", "0.2", "--num-blocks", "2",
                         "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "160",
                         "--window", "32", "--tasks", "none", "--output", str(out), *extra])


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="methods"):
        cmp.CompareConfig(methods=["midus", "nope"])
    with pytest.raises(ValueError, match="steps"):
        cmp.CompareConfig(steps=0)
    with pytest.raises(ValueError, match="limit"):
        cmp.CompareConfig(limit=-1)


def test_output_folder_with_other_files_is_refused_before_any_work(tmp_path, tiny_model_dir, tiny_text_file):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="--output"):
        cmp.run(_args(tiny_model_dir, tiny_text_file, tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_in_process_rows_same_budget_and_report_files(tmp_path, tiny_model_dir, tiny_text_file, one_thread):
    cfg = cmp.config_from_args(_args(tiny_model_dir, tiny_text_file, tmp_path, "--methods", "base,base_cpt,dus,midus"))
    report = cmp.compare(cfg, output_dir=str(tmp_path / "out"), in_process=True)
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["base", "base_cpt", "dus", "midus"]
    assert rows["base"]["params_added"] == 0 and "train_tokens" not in rows["base"]
    assert rows["dus"]["layers"] == rows["midus"]["layers"] == rows["base"]["layers"] + 2
    # a memory block has fewer parameters than the dense block it replaces only at real widths;
    # here we check the counts are those of the models built
    assert rows["midus"]["params_added"] > 0 and rows["dus"]["params_added"] > 0
    trained = [rows[m] for m in ("base_cpt", "dus", "midus")]
    assert len({r["train_tokens"] for r in trained}) == 1 and trained[0]["train_tokens"] == 2 * 2 * 32
    assert rows["midus"]["trainable"] == "new" and rows["dus"]["trainable"] == "all"
    for r in rows.values():
        assert r["ppl"] > 1.0 and r["eval_tokens"] > 0
    for r in trained:
        assert r["peak_memory_mib"] > 0 and r["s_per_step"] > 0
    # CPT changes the base model's perplexity; the reference row is the untouched base
    assert rows["base_cpt"]["ppl"] != rows["base"]["ppl"]
    out = tmp_path / "out"
    data = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in data["rows"]] == list(rows)
    md = (out / "compare.md").read_text()
    for r in rows.values():
        assert r["label"] in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_method_is_reported_in_its_row(tmp_path, tiny_model_dir, tiny_text_file, capsys):
    # a sequence longer than the training text fails in the workers that train (each in its own
    # process); the untrained base row still runs, and the report is written
    args = _args(tiny_model_dir, tiny_text_file, tmp_path / "out", "--methods", "base,midus", "--steps", "1",
                 "--seq-len", "100000")
    assert cmp.run(args) == 1
    report = json.loads((tmp_path / "out" / "compare.json").read_text())
    base, mid = report["rows"]
    assert "error" not in base and base["ppl"] > 1.0
    assert "seq_len" in mid["error"] and mid["error"].startswith("ValueError")
    assert "failed" in capsys.readouterr().out


def test_zero_shot_columns(tmp_path, tiny_model_dir, tiny_text_file, one_thread):
    args = _args(tiny_model_dir, tiny_text_file, tmp_path / "out", "--methods", "base,midus", "--steps", "1",
                 "--tasks", "arc_easy,csqa", "--limit", "3")
    report = cmp.compare(cmp.config_from_args(args), output_dir=str(tmp_path / "out"), in_process=True)
    for row in report["rows"]:
        assert set(row["zero_shot"]) == {"arc_easy", "csqa"}
        assert all(v["n"] == 3 and 0.0 <= v["acc"] <= 1.0 for v in row["zero_shot"].values())
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "arc_easy" in md and "mean acc" in md and "first 3 examples per task" in md
    assert "{" not in md  # every f-string filled in


def test_unknown_task_is_refused_before_any_work(tmp_path, tiny_model_dir, tiny_text_file):
    with pytest.raises(ValueError, match="tasks"):
        cmp.run(_args(tiny_model_dir, tiny_text_file, tmp_path / "out", "--tasks", "arc_easy,nope"))
    assert not (tmp_path / "out").exists()


def test_cli_wires_compare(capsys, tmp_path):
    from midus.cli import main

    assert main(["compare", "--methods", "midus,nope", "--output", str(tmp_path / "o")]) == 1
    assert "methods" in capsys.readouterr().err


@pytest.mark.parametrize("extra, match", [
    (["--model", "/no/such/model"], "--model"),
    (["--data", "/no/such/text.txt"], "--data"),
    (["--num-blocks", "9"], "num-blocks"),          # the tiny model has 4 layers
    (["--placement", "0,9", "--num-blocks", "2"], "placement"),
    (["--methods", "solar", "--num-blocks", "1"], "solar"),
    (["--window", "1"], "window"),
    (["--lr", "-1"], "lr"),
    (["--methods", "midus,midus"], "once"),
])
def test_bad_settings_are_refused_before_any_worker_runs(extra, match, tmp_path, tiny_model_dir, tiny_text_file,
                                                         capsys):
    from midus.cli import main

    argv = ["compare", "--model", tiny_model_dir, "--data", tiny_text_file, "--tasks", "none",
            "--output", str(tmp_path / "out")]
    for i in range(0, len(extra), 2):  # later flags replace the defaults above
        if extra[i] in argv:
            argv[argv.index(extra[i]) + 1] = extra[i + 1]
        else:
            argv += extra[i:i + 2]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and "compare 1/" not in err, err
    assert not (tmp_path / "out").exists()


def test_deus_rows_and_importance_placement_in_process(tmp_path, tiny_model_dir, tiny_text_file, one_thread):
    """The Avg-/OpT-DeUS rows at tiny size: the same budget, their new layers trained (as the paper),
    labels in the report; --placement importance is measured per run on the training text."""
    cfg = cmp.config_from_args(_args(tiny_model_dir, tiny_text_file, tmp_path, "--methods", "avg_deus,opt_deus",
                                     "--placement", "importance", "--importance", "layer"))
    assert cfg.placement == "importance" and cfg.importance == "layer"
    report = cmp.compare(cfg, output_dir=str(tmp_path / "out"), in_process=True)
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["avg_deus", "opt_deus"] and all("error" not in r for r in rows.values())
    for r in rows.values():
        assert r["layers"] == 6 and r["params_added"] > 0 and r["trainable"] == "new" and r["ppl"] > 1.0
        assert len(r["base_layers"]) == 2 and r["train_tokens"] == 2 * 2 * 32
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "Avg-DeUS" in md and "OpT-DeUS" in md and "importance" in md


def test_deus_methods_are_listed_and_importance_is_checked():
    assert {"avg_deus", "opt_deus"} <= set(cmp.METHODS)
    with pytest.raises(ValueError, match="importance"):
        cmp.CompareConfig(importance="neurons")
