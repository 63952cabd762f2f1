"""The teacher's classes and the data's labels are matched by name when both sides have names:
a teacher whose classes are in another order than the data's labels is used by name, never by index;
names that disagree are refused; the log says which rule was used; a teacher below chance is warned of."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cli_fixtures import make_data, make_teacher, write_csv  # noqa: E402

from sage_fast.cli import main  # noqa: E402
from sage_fast.train import ModelError  # noqa: E402
from sage_fast.train.config import DistillConfig  # noqa: E402
from sage_fast.train.data import load_files  # noqa: E402
from sage_fast.train.label_identity import align_to_teacher, below_chance, match_by_name  # noqa: E402
from sage_fast.train.setup import build_setup  # noqa: E402
from sage_fast.train.teacher import TeacherSettings, fine_tune_teacher  # noqa: E402

WORDS = {"fresh": "great fun superb", "rotten": "awful dull boring"}


def named_rows(n=120):
    return [(f"{WORDS['fresh' if i % 2 else 'rotten']} number {i}", "fresh" if i % 2 else "rotten") for i in range(n)]


@pytest.fixture(scope="module")
def swapped_teacher(tmp_path_factory):
    """A teacher that learned the task, then saved with its classes in the other order (rotten first,
    as the built-in task numbers them) while the data's labels sort fresh first."""
    root = tmp_path_factory.mktemp("labels")
    make_teacher(root / "base", 2)
    write_csv(root / "data.csv", named_rows())
    data = load_files(root / "data.csv", task="toy")
    assert data.label_names == ["fresh", "rotten"]
    folder = fine_tune_teacher(str(root / "base"), data, settings=TeacherSettings(epochs=6, batch_size=16, lr=3e-3,
                                                                                  max_length=12),
                               cache_dir=root / "teachers", progress=False, log=lambda *a: None)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True)
    with torch.no_grad():  # the same predictions, under the other numbering of the classes
        model.classifier.weight.copy_(model.classifier.weight.flip(0))
        model.classifier.bias.copy_(model.classifier.bias.flip(0))
    model.config.id2label = {0: "rotten", 1: "fresh"}
    model.config.label2id = {"rotten": 0, "fresh": 1}
    model.save_pretrained(root / "teacher")
    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(root / "teacher")
    return root


def test_names_in_another_order_renumber_the_data():
    assert match_by_name(["rotten", "fresh"], ["fresh", "rotten"], "t") == [1, 0]
    assert match_by_name(["Fresh", "Rotten"], ["fresh", "rotten"], "t") == [0, 1]
    assert match_by_name(None, ["fresh", "rotten"], "t") is None  # a teacher of LABEL_0.. only: by index
    assert match_by_name(["neg", "pos"], ["0", "1"], "t") is None  # data labelled by class number: by index
    with pytest.raises(ModelError, match="names disagree"):
        match_by_name(["negative", "positive"], ["fresh", "rotten"], "t")


def test_align_says_which_rule_and_keeps_every_row_with_its_label(tmp_path):
    write_csv(tmp_path / "d.csv", named_rows(40))
    data = load_files(tmp_path / "d.csv", task="toy")
    said = []
    config = transformers.BertConfig(id2label={0: "rotten", 1: "fresh"}, label2id={"rotten": 0, "fresh": 1})
    aligned = align_to_teacher(data, config, "t", log=said.append)
    assert aligned.label_names == ["rotten", "fresh"] and "by name" in said[0] and "fresh: 0 -> 1" in said[0]
    for before, after in zip(data.splits().values(), aligned.splits().values()):
        assert [data.label_names[y] for y in before.labels] == [aligned.label_names[y] for y in after.labels]
        assert before.texts == after.texts
    said.clear()
    align_to_teacher(data, transformers.BertConfig(), "t", log=said.append)
    assert "by index" in said[0] and "0=fresh" in said[0]


def test_below_chance_is_warned():
    assert below_chance(0.2, 2, "validation", "the teacher x") is not None
    assert below_chance(0.5, 2, "validation", "the teacher x") is None
    assert below_chance(0.3, 4, "validation", "x") is None


def test_a_teacher_in_the_other_class_order_scores_by_name(swapped_teacher, tmp_path):
    root = swapped_teacher
    said = []
    config = DistillConfig(teacher=str(root / "teacher"), student="from-teacher:2", train_file=str(root / "data.csv"),
                           max_length=12, mode="kd", compare=[], device="cpu", progress=False,
                           output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache")).validate()
    setup = build_setup(config, log=said.append)
    assert setup.data.label_names == ["rotten", "fresh"]
    assert any("by name" in line for line in said), said
    # Read by index, this teacher scores near 0; matched by name, it scores as it learned to.
    assert setup.teacher_metrics["validation_accuracy_vector"] >= 0.9
    assert not setup.warnings
    assert setup.student_init.config.id2label == {0: "rotten", 1: "fresh"}


def test_names_that_disagree_are_refused_in_one_paragraph(tmp_path, capsys):
    make_teacher(tmp_path / "teacher", 2)
    config = json.loads((tmp_path / "teacher" / "config.json").read_text())
    config.update(id2label={"0": "negative", "1": "positive"}, label2id={"negative": 0, "positive": 1})
    (tmp_path / "teacher" / "config.json").write_text(json.dumps(config))
    write_csv(tmp_path / "data.csv", named_rows())
    code = main(["distill", "--teacher", str(tmp_path / "teacher"), "--train-file", str(tmp_path / "data.csv"),
                 "--student", "from-teacher:2", "--max-length", "12", "--mode", "kd", "--compare", "none",
                 "--device", "cpu", "--no-progress", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "names disagree" in err.strip().splitlines()[-1]


def test_a_teacher_below_chance_is_warned_in_the_log(swapped_teacher, tmp_path):
    """Without names the classes are matched by index: here wrongly, which the teacher's score shows."""
    root = swapped_teacher
    config = json.loads((root / "teacher" / "config.json").read_text())
    config.update(id2label={"0": "LABEL_0", "1": "LABEL_1"}, label2id={"LABEL_0": 0, "LABEL_1": 1})
    unnamed = tmp_path / "teacher"
    unnamed.mkdir()
    for path in (root / "teacher").iterdir():
        (unnamed / path.name).write_bytes(path.read_bytes())
    (unnamed / "config.json").write_text(json.dumps(config))
    said = []
    config = DistillConfig(teacher=str(unnamed), student="from-teacher:2", train_file=str(root / "data.csv"),
                           max_length=12, mode="kd", compare=[], device="cpu", progress=False,
                           output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache")).validate()
    setup = build_setup(config, log=said.append)
    assert any("by index" in line for line in said), said
    assert setup.teacher_metrics["validation_accuracy_vector"] < 0.5
    assert len(setup.warnings) == 1 and "below chance" in setup.warnings[0]
    assert any(line.startswith("warning: ") and "below chance" in line for line in said)


def test_a_teacher_that_predicts_one_class_is_warned():
    from sage_fast.train.label_identity import teacher_warnings

    from sage_fast.train.data import Split, TaskData

    data = TaskData("toy", Split(["a", "b"], [0, 1]), Split(["a", "b"], [0, 1]), Split(["a", "b"], [0, 1]),
                    ["neg", "pos"])
    said = []
    outputs = {"validation": {"logits": torch.tensor([[0.0, 2.0], [0.0, 3.0]])}}
    warnings = teacher_warnings({"validation_accuracy_vector": 0.5}, data, "T", said.append, outputs)
    assert len(warnings) == 1 and "the teacher T predicts one class ('pos') for every row of validation" in warnings[0]
    assert said == [f"warning: {warnings[0]}"]
