"""A teacher that is broken is never cached or used silently: a fine-tuning that diverges stops with
a message and leaves nothing behind, a cached teacher with non-finite weights is trained again, a
teacher whose outputs are not finite is named in the error (and its outputs are never cached), and
what killed writers leave in the caches is removed. Two writers of one key do not fail."""
import os
import subprocess
import sys
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cli_fixtures import make_data, make_teacher  # noqa: E402

from sage_fast.cli import main  # noqa: E402
from sage_fast.train import ModelError, teacher_cache  # noqa: E402
from sage_fast.train.checkpoint import publish_folder  # noqa: E402
from sage_fast.train.data import load_files  # noqa: E402
from sage_fast.train.teacher import (  # noqa: E402
    METRICS_FILE,
    TeacherDiverged,
    TeacherSettings,
    _cached,
    fine_tune_teacher,
    remove_stale_staging,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_safety")
    make_teacher(root / "base", 2)
    make_data(root / "data.csv")
    return root


def dead_pid():
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def settings(lr):
    return TeacherSettings(epochs=1, batch_size=16, lr=lr, max_length=12)


def poison(folder):
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_a_diverging_fine_tune_stops_and_caches_nothing(tiny, tmp_path):
    data = load_files(tiny / "data.csv", task="toy")
    with pytest.raises(TeacherDiverged, match=r"diverged: the loss is nan .*learning rate 1e\+06"):
        fine_tune_teacher(str(tiny / "base"), data, settings=settings(1e6), cache_dir=tmp_path, progress=False,
                          log=lambda *a: None)
    assert list(tmp_path.iterdir()) == []


def test_the_teacher_command_says_so_in_one_paragraph(tiny, tmp_path, capsys):
    code = main(["teacher", "--base", str(tiny / "base"), "--train-file", str(tiny / "data.csv"), "--lr", "1e6",
                 "--max-length", "12", "--batch-size", "16", "--cache-dir", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "diverged" in err.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


def test_a_cached_teacher_with_non_finite_weights_is_trained_again(tiny, tmp_path):
    data = load_files(tiny / "data.csv", task="toy")
    said = []
    folder = fine_tune_teacher(str(tiny / "base"), data, settings=settings(1e-3), cache_dir=tmp_path,
                               progress=False, log=said.append)
    poison(folder)
    said.clear()
    again = fine_tune_teacher(str(tiny / "base"), data, settings=settings(1e-3), cache_dir=tmp_path,
                              progress=False, log=said.append)
    assert again == folder and any("non-finite weights" in line for line in said), said
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True)
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # nothing set aside is left


def test_a_teacher_with_non_finite_outputs_is_named_and_its_outputs_never_cached(tiny, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    make_teacher(teacher, 2)
    poison(teacher)
    code = main(["distill", "--teacher", str(teacher), "--student", "from-teacher:2", "--train-file",
                 str(tiny / "data.csv"), "--max-length", "12", "--mode", "kd", "--compare", "none", "--device", "cpu",
                 "--no-progress", "--output-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err and "non-finite logits" in last and str(teacher) in last, err
    assert not list((tmp_path / "cache").glob("teacher-*.pt"))


def test_cached_non_finite_outputs_are_refused_too(tmp_path):
    outputs = {"logits": torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), "hidden": {}}
    teacher_cache.save_atomic({"format": teacher_cache.CACHE_FORMAT, "outputs": outputs}, tmp_path / "teacher-k.pt")
    with pytest.raises(ModelError, match="the teacher T gives non-finite logits .* on 1 of the 2 test"):
        teacher_cache.load_or_compute(tmp_path, "k", lambda: outputs, teacher="T", split="test")


def test_killed_writers_leftovers_are_removed_from_both_caches(tmp_path):
    dead, alive = dead_pid(), os.getpid()
    hours_ago = time.time() - 2 * 3600
    for pid, stamp in ((dead, hours_ago), (alive, hours_ago), (dead + 1_000_000, None)):
        # the last: a writer unknown here (another host's?) that wrote a moment ago is left alone
        for leftover in (tmp_path / f".teacher-abc.pt.{pid}.x1y2.tmp", tmp_path / f".minilm-toy-0123.{pid}.k3j4"):
            if leftover.suffix == ".tmp":
                leftover.write_bytes(b"partial")
            else:
                leftover.mkdir()
            if stamp is not None:
                os.utime(leftover, (stamp, stamp))
    teacher_cache.load_or_compute(tmp_path, "k", lambda: {"logits": torch.zeros(2, 2), "hidden": {}})
    removed = remove_stale_staging(tmp_path, log=lambda *a: None, older_than=3600)
    assert [p.name for p in removed] == [f".minilm-toy-0123.{dead}.k3j4"]
    kept = [f".teacher-abc.pt.{pid}.x1y2.tmp" for pid in (alive, dead + 1_000_000)]
    kept += [f".minilm-toy-0123.{pid}.k3j4" for pid in (alive, dead + 1_000_000)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "teacher-k.pt"])


def made(folder, text):
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / METRICS_FILE).write_text(text)
    return folder


def test_a_second_writer_of_one_key_keeps_the_first_and_force_replaces_it(tmp_path):
    target = made(tmp_path / "key", "first")
    publish_folder(made(tmp_path / ".key.1.a", "second"), target, replace=False, keep=_cached)
    assert (target / METRICS_FILE).read_text() == "first"
    publish_folder(made(tmp_path / ".key.1.b", "forced"), target, replace=True, keep=_cached)
    assert (target / METRICS_FILE).read_text() == "forced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]
