"""A run folder holds one run: a fresh run into a used folder is refused (unless --overwrite), a
checkpoint is continued only with its settings, on its data and with at least the steps it has done,
and data paths are saved so that --resume and analyze work from another directory."""
import json

import pytest

pytest.importorskip("transformers")

from cli_fixtures import distill_args, make_data, make_teacher  # noqa: E402

from sage_fast.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_identity")
    make_teacher(root / "teacher", 2)
    make_data(root / "data.csv")
    return root


def kd(tiny, out, *more):
    return distill_args(tiny, out) + ["--mode", "kd", "--compare", "none", "--max-steps", "2", *more]


def refused(capsys, argv, needle):
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"sage-fast {argv[0]}: ") and needle in last, err
    return last


def test_a_fresh_run_into_a_used_folder_is_refused_and_overwrite_replaces_it(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(kd(tiny, out)) == 0
    before = {name: (out / name).read_text() for name in ("config.json", "results.json")}
    # another mode with other settings: nothing of the first run may change
    refused(capsys, distill_args(tiny, out) + ["--mode", "random", "--compare", "none", "--max-steps", "1",
                                                "--lr", "1e-3"], "already holds a run")
    assert {name: (out / name).read_text() for name in before} == before
    assert main(distill_args(tiny, out) + ["--mode", "random", "--compare", "none", "--max-steps", "1",
                                           "--lr", "1e-3", "--overwrite"]) == 0
    assert not (out / "kd").exists() and json.loads((out / "config.json").read_text())["mode"] == "random"


def test_a_checkpoint_of_other_settings_is_not_continued_or_compared(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(kd(tiny, out)) == 0
    config = json.loads((out / "config.json").read_text())
    config["lr"] = 1e-3  # as when another run wrote its config over this one's
    (out / "config.json").write_text(json.dumps(config))
    refused(capsys, ["distill", "--resume", "--output-dir", str(out), "--max-steps", "3", "--no-progress"],
            "other settings than this run's (lr 0.0001 there, 0.001 here)")


def test_a_resume_on_changed_data_is_refused(tiny, tmp_path, capsys):
    make_data(tmp_path / "data.csv")
    (tmp_path / "teacher").symlink_to(tiny / "teacher")
    out = tmp_path / "run"
    assert main(kd(tmp_path, out)) == 0
    make_data(tmp_path / "data.csv", seed=7)  # as many rows, other texts
    refused(capsys, ["distill", "--resume", "--output-dir", str(out), "--max-steps", "3", "--no-progress"],
            "trained on other data than this run reads")
    make_data(tmp_path / "data.csv", n=150)  # other rows altogether
    refused(capsys, ["distill", "--resume", "--output-dir", str(out), "--max-steps", "3", "--no-progress"],
            "trained on other data than this run reads (rows then: train 96")


def test_fewer_steps_than_done_are_refused(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(kd(tiny, out)) == 0
    refused(capsys, ["distill", "--resume", "--output-dir", str(out), "--max-steps", "1", "--no-progress"],
            "has done 2 steps, more than the 1 this run asks for")


def test_resume_and_analyze_work_from_another_directory(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tiny)
    out = tmp_path / "run"
    args = ["distill", "--teacher", "teacher", "--student", "from-teacher:2", "--train-file", "data.csv",
            "--epochs", "1", "--batch-size", "16", "--max-length", "12", "--synthetic-per-round", "16",
            "--synthetic-per-batch", "4", "--pool-size", "32", "--n-neighbors", "5", "--device", "cpu",
            "--no-progress", "--output-dir", str(out), "--cache-dir", "cache", "--max-steps", "2", "--compare", "none"]
    assert main(args) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["train_file"] == str(tiny / "data.csv") and saved["teacher"] == str(tiny / "teacher")
    monkeypatch.chdir(tmp_path)
    assert main(["distill", "--resume", "--output-dir", str(out), "--max-steps", "3", "--no-progress"]) == 0, \
        capsys.readouterr().err
    assert main(["analyze", str(out), "--no-progress"]) == 0, capsys.readouterr().err
