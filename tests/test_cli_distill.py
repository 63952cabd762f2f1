"""`sage-fast distill` and `sage-fast analyze` end to end on tiny models (bad input: test_cli_bad_input.py)."""
import json
import re
import shutil

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("umap")

from cli_fixtures import distill_args, make_data, make_teacher  # noqa: E402

from sage_fast.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Data a model can learn, a tiny teacher fine-tuned on it, and a 1-layer student config."""
    from sage_fast.train.data import load_files
    from sage_fast.train.teacher import TeacherSettings, fine_tune_teacher, read_teacher_metrics

    root = tmp_path_factory.mktemp("tiny_cli")
    make_teacher(root / "base", 2)
    make_data(root / "data.csv", n=200)
    settings = TeacherSettings(epochs=8, batch_size=16, lr=1e-2, max_length=12)
    folder = fine_tune_teacher(str(root / "base"), load_files(root / "data.csv", task="data"), settings=settings,
                               cache_dir=root / "teachers", progress=False, log=lambda _: None)
    assert read_teacher_metrics(folder)["test_accuracy"] >= 0.9  # measured 1.0 (20 examples)
    shutil.copytree(folder, root / "teacher")
    config = transformers.AutoConfig.from_pretrained(root / "base")
    config.num_hidden_layers = 1
    (root / "student.json").write_text(config.to_json_string())  # a config not named config.json
    return root


def base_args(tiny, out):
    return distill_args(tiny, out)


def test_distill_in_every_mode_then_analyze(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "settings.yaml"
    config.write_text("lr: 0.01\nanalysis_every: 3\n")
    # The student starts from random weights (a config file), so what it reaches is what training taught it.
    args = base_args(tiny, out) + ["--student", str(tiny / "student.json"), "--epochs", "2"]
    assert main(args + ["--compare", "kd,random", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    for word in ("teacher", "sage", "kd", "random", "test acc", "sage-fast export"):
        assert word in printed
    saved = json.loads((out / "config.json").read_text())
    assert saved["lr"] == 0.01 and saved["analysis_every"] == 3 and saved["compare"] == ["kd", "random"]
    assert (out / "config.yaml").is_file() and (out / "results.txt").is_file()
    results = json.loads((out / "results.json").read_text())
    assert [m["mode"] for m in results["modes"]] == ["sage", "kd", "random"]
    for mode in ("sage", "kd", "random"):
        records = [json.loads(line) for line in (out / mode / "metrics.jsonl").read_text().splitlines()]
        kinds = {r["kind"] for r in records}
        assert {"train", "eval", "final"} <= kinds
        assert (out / mode / "checkpoint.pt").is_file()
        assert (out / mode / "trained" / "student" / "config.json").is_file()
        final = records[-1]
        # Chance is 0.5 (alternating labels); every mode measured 1.0 on the 20 test examples.
        assert final["accuracy"] >= 0.8 and final["examples_per_second"] > 0, (mode, final)
        assert ("analysis" in kinds) == (mode != "kd")
    synthetic = {m["mode"]: m["synthetic_examples"] for m in results["modes"]}
    assert synthetic["kd"] == 0 and synthetic["sage"] == synthetic["random"] > 0
    assert list((out / "sage").glob("loss_map_round*.png"))

    png = tmp_path / "map.png"
    assert main(["analyze", str(out), "--output", str(png)]) == 0
    assert png.is_file() and str(png) in capsys.readouterr().out


def test_analyze_without_a_checkpoint(tmp_path, capsys):
    assert main(["analyze", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    damaged = tmp_path / "checkpoint.pt"
    damaged.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    assert main(["analyze", str(damaged)]) == 2
    err = capsys.readouterr().err
    assert "not a readable checkpoint" in err and "written by sage-fast distill" in err and "Traceback" not in err


def test_help_shows_each_default_once_and_no_unset_ones(capsys):
    from sage_fast.cli import COMMANDS

    for command in COMMANDS:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in text and "(default: False)" not in text, command
        assert not re.search(r"\(default:[^)]*\) \(default:", text), command
    with pytest.raises(SystemExit):
        main(["teacher", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--batch-size BATCH_SIZE examples per optimiser step (default: 32)" in text


def test_ctrl_c_before_training_says_how_to_resume(tiny, tmp_path, capsys, monkeypatch):
    from sage_fast.train import loop

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    monkeypatch.setattr(loop, "build_setup", ctrl_c)
    assert main(base_args(tiny, out) + ["--compare", "none"]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"sage-fast distill --resume --output-dir {out}" in err
    monkeypatch.undo()
    assert main(["distill", "--resume", "--output-dir", str(out)]) == 0
    assert (out / "results.json").is_file()


@pytest.mark.parametrize("generator, extra", [
    ("interpolate", []),
    ("substitute", ["--substitute-share", "0.3", "--substitute-span", "0.2", "--compare", "random"]),
    ("boundary", ["--boundary-steps", "2", "--boundary-step-size", "0.1"]),
    ("substitute", ["--synthetic-volume", "2", "--synthetic-share", "0.5", "--label-batch-size", "40"]),
], ids=["interpolate", "substitute-and-its-random-control", "boundary", "substitute-at-volume"])
def test_each_generator_runs_end_to_end(tiny, tmp_path, capsys, generator, extra):
    out = tmp_path / "run"
    args = base_args(tiny, out) + ["--generator", generator, "--max-steps", "6", "--analysis-every", "2",
                                   "--compare", "none", *extra]
    assert main(args) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())
    assert saved["generator"] == generator
    results = json.loads((out / "results.json").read_text())
    for row in results["modes"]:
        assert row["synthetic_examples"] > 0 and row["steps"] == 6, row
        records = [json.loads(line) for line in (out / row["mode"] / "metrics.jsonl").read_text().splitlines()]
        rounds = [r for r in records if r["kind"] == "analysis"]
        assert rounds, row["mode"]
        # rows of real tokens are shown decoded, in the log and the metrics; vectors are not
        assert all(("decoded" in r) == (generator == "substitute") for r in rounds)
        assert (f"[{row['mode']}] round 1: " in printed) == (generator == "substitute")
    # the loss map of the trained student, whatever made its rows
    assert main(["analyze", str(out), "--output", str(tmp_path / "map.png")]) == 0 and (tmp_path / "map.png").is_file()
    if "--synthetic-volume" in extra:
        from sage_fast.synthesis.volume import rows_per_round
        from sage_fast.train.data import load_files

        assert saved["synthetic_per_batch"] == 16  # half of each step's 32 rows
        n_train = len(load_files(tiny / "data.csv", task="data").train.labels)
        assert {r["synthetic"] for r in rounds} == {rows_per_round(2, n_train, n_train // 16, 2)}
        assert results["modes"][0]["synthetic_examples"] == 16 * (6 - 3)  # the pool fills after step 3
