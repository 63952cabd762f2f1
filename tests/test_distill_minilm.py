"""The offline default path end to end with the real packaged MiniLM on a few hundred real snippets:
teacher fine-tuned from the base model, a student from its layers, SAGE against KD, then export."""
import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("umap")

from sage_fast.cli import main  # noqa: E402


@pytest.mark.slow
def test_real_minilm_distill_sage_against_kd_then_export(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["distill", "--max-train-examples", "256", "--max-eval-examples", "96", "--teacher-epochs", "1",
            "--max-length", "32",
            "--epochs", "2", "--batch-size", "32", "--synthetic-per-round", "64", "--pool-size", "128",
            "--n-neighbors", "10", "--compare", "kd", "--device", "cpu", "--no-progress",
            "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "teacher" in printed and "sage" in printed and "kd" in printed

    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["teacher_test_accuracy"] <= 1.0
    modes = {m["mode"]: m for m in results["modes"]}
    assert set(modes) == {"sage", "kd"}
    assert modes["sage"]["analysis_rounds"] >= 1 and modes["sage"]["synthetic_examples"] > 0
    assert modes["kd"]["synthetic_examples"] == 0
    for run in modes.values():
        assert 0.0 <= run["accuracy"] <= 1.0 and run["real_examples"] > 0
    assert list((out / "sage").glob("loss_map_round*.png"))
    config = json.loads((out / "config.json").read_text())
    assert config["max_train_examples"] == 256 and config["mode"] == "sage"

    exported = tmp_path / "student"
    assert main(["export", results["trained"]["sage"], "--out", str(exported)]) == 0
    assert (exported / "config.json").is_file() and list(exported.glob("tokenizer*"))
