"""An export never loses what was there: it is written beside --out and renamed into place, so a
kill or a full disk during a re-export leaves the previous export whole; a destination a run, mode,
trained student or teacher needs is refused; safetensors' write error is said in one paragraph."""
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from cli_fixtures import distill_args, make_data, make_teacher  # noqa: E402

from sage_fast.cli import main  # noqa: E402
from sage_fast.train import models  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_safety")
    make_teacher(root / "teacher", 2)
    make_data(root / "data.csv")
    assert main(distill_args(root, root / "run") + ["--mode", "kd", "--compare", "none", "--max-steps", "2"]) == 0
    return root


def export(root, out):
    return main(["export", str(root / "run" / "kd" / "trained"), "--out", str(out)])


def last_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def test_a_re_export_that_fails_midway_keeps_the_previous_export(root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "student"
    assert export(root, out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = models.export_student

    def killed(interface, tokenizer, out_dir, student=None):
        real(interface, tokenizer, out_dir, student)
        (out_dir / "model.safetensors").write_bytes(b"torn")
        raise OSError(28, "No space left on device", str(out_dir / "model.safetensors"))

    monkeypatch.setattr(models, "export_student", killed)
    assert export(root, out) == 1
    assert "No space left on device" in last_line(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no staging folder left


def test_a_safetensors_write_error_is_one_paragraph(root, tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(models, "export_student", full)
    assert export(root, tmp_path / "student") == 1
    line = last_line(capsys)
    assert line.startswith("sage-fast export: writing a weights file failed") and "StorageFull" in line
    assert not (tmp_path / "student").exists()


@pytest.mark.parametrize("where", ["run", "run/kd", "run/kd/trained", "teacher", "other"])
def test_a_folder_sage_fast_needs_is_refused_as_out(root, tmp_path, capsys, where):
    if where == "other":
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "todo.txt").write_text("keep me")
        out = tmp_path / "notes"
    else:
        out = root / where
    before = sorted(p.name for p in out.iterdir())
    assert export(root, out) == 2
    assert last_line(capsys).startswith("sage-fast export: --out ")
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_teacher_folder_the_student_points_to_is_refused(root, tmp_path, capsys):
    import json

    from sage_fast.train.models import INTERFACE_FILE

    trained = root / "run" / "kd" / "trained"
    record = json.loads((trained / INTERFACE_FILE).read_text())
    assert record["teacher"] == str((root / "teacher").resolve())
    assert main(["export", str(trained), "--out", str(root / "teacher")]) == 2
    assert "the teacher that student was trained with" in last_line(capsys)


def test_a_killed_exports_staging_folder_is_removed(root, tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".student.{int(done.stdout)}.abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert export(root, tmp_path / "student") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]
