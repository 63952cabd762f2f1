"""A student that predicts one class for every row is said so, in the log and under the results
table: its accuracy alone (the majority class's share) can look like learning."""
import pytest
import torch

pytest.importorskip("transformers")

from cli_fixtures import distill_args, make_data, make_teacher  # noqa: E402

from sage_fast.cli import main  # noqa: E402
from sage_fast.train import loop  # noqa: E402
from sage_fast.train.metrics import one_class_warning  # noqa: E402


def test_one_class_is_warned_and_two_are_not():
    said = one_class_warning(torch.tensor([0, 12]), ["rotten", "fresh"], "test", "the kd student")
    assert said.startswith("the kd student predicts one class ('fresh') for every row of test (12 rows)")
    assert one_class_warning(torch.tensor([1, 11]), ["rotten", "fresh"], "test", "s") is None
    assert one_class_warning(torch.tensor([0, 0]), ["a", "b"], "test", "s") is None  # nothing evaluated


def test_a_student_stuck_at_one_class_is_warned_under_the_table(tmp_path, monkeypatch, capsys):
    make_teacher(tmp_path / "teacher", 2)
    make_data(tmp_path / "data.csv")

    def stuck(run):  # the head says class 1 whatever it reads
        with torch.no_grad():
            head = run.interface.student.classifier
            head.weight.zero_()
            head.bias.copy_(torch.tensor([-50.0, 50.0]))

    run = loop.run  # the command's run, with the callback
    monkeypatch.setattr(loop, "run", lambda *args, **kwargs: run(*args, callbacks=[stuck], **kwargs))
    code = main(distill_args(tmp_path, tmp_path / "run") + ["--mode", "kd", "--compare", "none", "--max-steps", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "warning: the kd student predicts one class ('1') for every row of validation" in out
    table = out[out.index("model"):]
    assert "warning: the kd student predicts one class ('1') for every row of test" in table
