"""A student the driver cannot train, and a setting only the synthesizer would refuse, are refused
in one paragraph before any data, teacher or baseline work, never with a traceback mid-run."""
import json

import pytest

transformers = pytest.importorskip("transformers")

from cli_fixtures import distill_args, make_data, make_teacher  # noqa: E402

from sage_fast.cli import main  # noqa: E402
from sage_fast.train import ModelError  # noqa: E402
from sage_fast.train.models import check_student_config  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("student_checks")
    make_teacher(root / "teacher", 2)
    make_data(root / "data.csv")
    return root


def bert(**values):
    return {**transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64).to_dict(), **values}


def gpt2(**values):
    return {**transformers.GPT2Config(vocab_size=30522, n_embd=32, n_layer=1, n_head=2, n_positions=64).to_dict(),
            **values}


STUDENTS = {
    "too few positions": (bert(max_position_embeddings=8),
                          "has 8 position embeddings, fewer than --max-length 12 tokens: use --max-length 8 or less"),
    "a GPT-2 without a padding token": (gpt2(), "has no padding token"),
    "heads that do not divide the width": (bert(hidden_size=30, num_attention_heads=4),
                                           "has hidden size 30, which its 4 attention heads do not divide"),
}


@pytest.mark.parametrize("name", list(STUDENTS))
def test_a_student_the_driver_cannot_use_is_refused_before_any_work(tiny, tmp_path, capsys, name):
    values, needle = STUDENTS[name]
    spec = tmp_path / "student.json"
    spec.write_text(json.dumps(values))
    code = main(distill_args(tiny, tmp_path / "run") + ["--student", str(spec), "--mode", "kd", "--compare", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert needle in err.strip().splitlines()[-1], err
    assert not (tiny / "cache").exists() or not any((tiny / "cache").iterdir())  # no teacher pass was made


def test_the_same_checks_hold_for_a_built_student():
    with pytest.raises(ModelError, match="no padding token"):
        check_student_config(transformers.GPT2Config(), "gpt2", 12)
    check_student_config(transformers.GPT2Config(pad_token_id=50256), "gpt2", 12)
    with pytest.raises(ModelError, match="use --max-length 510 or less"):  # RoBERTa's two positions before the first
        check_student_config(transformers.RobertaConfig(max_position_embeddings=512, pad_token_id=1), "r", 600)


def test_n_neighbors_1_is_refused_before_a_baseline_runs(tiny, tmp_path, capsys):
    code = main(distill_args(tiny, tmp_path / "run") + ["--mode", "kd", "--compare", "sage", "--n-neighbors", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "n-neighbors must be an integer in [2, inf], got 1" in err.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_the_teacher_commands_settings_are_checked_before_its_data(tmp_path, capsys):
    code = main(["teacher", "--train-file", str(tmp_path / "absent.csv"), "--lr", "-1", "--cache-dir",
                 str(tmp_path / "teachers"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "lr" in err.strip().splitlines()[-1] and "absent.csv" not in err
