"""The offline default path end to end with the real packaged MiniLM on real snippets: a teacher
fine-tuned from the base model, a student from its layers, SAGE against KD, then export.

Sized so that the models learn something measurable on two CPU cores (about five minutes): 512
training snippets, two teacher epochs, three student epochs at a raised learning rate. Measured on
this setting: teacher 0.78, SAGE 0.73, KD 0.735 test accuracy on 200 test rows whose majority class
is 50.5%; with 200 rows, chance accuracy has a standard deviation of about 0.035."""
import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("umap")

from sage_fast.cli import main  # noqa: E402
from sage_fast.train.data import load_task  # noqa: E402

TRAIN, EVAL = 512, 200


@pytest.mark.slow
def test_real_minilm_distill_sage_against_kd_then_export(tmp_path, capsys, monkeypatch):
    # Its own cache for the fine-tuned teacher too: the result never depends on what ran before.
    monkeypatch.setenv("SAGE_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = ["distill", "--max-train-examples", str(TRAIN), "--max-eval-examples", str(EVAL),
            "--teacher-epochs", "2", "--max-length", "32", "--epochs", "3", "--batch-size", "32", "--lr", "5e-4",
            "--synthetic-per-round", "64", "--pool-size", "128", "--n-neighbors", "10", "--compare", "kd",
            "--device", "cpu", "--no-progress", "--output-dir", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "teacher" in printed and "sage" in printed and "kd" in printed

    test_labels = load_task("rotten_tomatoes", max_train_examples=TRAIN, max_eval_examples=EVAL,
                            seed=0).test.labels
    majority = max(test_labels.count(label) for label in set(test_labels)) / len(test_labels)
    results = json.loads((out / "results.json").read_text())
    # Well above always answering the majority class (a margin of 4 to 6 standard deviations of chance).
    assert results["teacher_test_accuracy"] >= majority + 0.2
    modes = {m["mode"]: m for m in results["modes"]}
    assert set(modes) == {"sage", "kd"}
    steps_per_epoch = TRAIN // 32
    rounds = len(range(steps_per_epoch // 3, 3 * steps_per_epoch, steps_per_epoch // 3))  # three an epoch
    assert modes["sage"]["analysis_rounds"] == rounds and modes["sage"]["synthetic_examples"] > 0
    assert modes["kd"]["synthetic_examples"] == 0 and modes["kd"]["analysis_rounds"] == 0
    for run in modes.values():
        assert run["accuracy"] >= majority + 0.15, run
        assert run["real_examples"] == 3 * TRAIN
    assert len(list((out / "sage").glob("loss_map_round*.png"))) == rounds
    config = json.loads((out / "config.json").read_text())
    assert config["max_train_examples"] == TRAIN and config["mode"] == "sage"

    exported = tmp_path / "student"
    assert main(["export", results["trained"]["sage"], "--out", str(exported)]) == 0
    assert (exported / "config.json").is_file() and list(exported.glob("tokenizer*"))
