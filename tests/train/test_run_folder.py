"""Nothing lost, nothing mixed in a run folder: one process per folder (a lock naming its holder),
SIGTERM handled like Ctrl-C, no log emptied by a failed resume, no temporary left for ever, and a
run that diverges stops without overwriting its last good checkpoint. Real processes where the
behaviour is the operating system's (signals, locks, kills)."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

pytest.importorskip("transformers")

from cli_fixtures import distill_args, make_data, make_teacher  # noqa: E402

from sage_fast.cli import main  # noqa: E402
from sage_fast.train import checkpoint, loop, run_lock  # noqa: E402
from sage_fast.train.config import resolve  # noqa: E402
from sage_fast.train.metrics import MetricsLog  # noqa: E402
from sage_fast.train.run_lock import LOCK_NAME, RunFolderBusy, RunLock  # noqa: E402

STEPS_PER_EPOCH = 6  # make_data's 120 rows leave 96 for training: batches of 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_folder")
    make_teacher(root / "teacher", 2)
    make_data(root / "data.csv")
    return root


def kd_args(tiny, out, *more):
    return distill_args(tiny, out) + ["--mode", "kd", "--compare", "none", *more]


def records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def python(code, *args, **kwargs):
    """A separate Python process running ``code`` (a real process: its own pid, signals, locks)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for(path, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the process ended (exit {process.returncode}) before {path.name} appeared:\n{out}\n{err}")
        assert time.monotonic() < deadline, f"{path.name} did not appear in {timeout} s"
        time.sleep(0.05)


def dead_pid():
    """The id of a process that has ended (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


# ------------------------------------------------------------------------------------------ metrics log
def test_metrics_log_leaves_the_file_alone_until_its_first_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n')
    before = path.read_bytes()
    log = MetricsLog(path)
    assert path.read_bytes() == before  # opening it truncated the file before
    log = MetricsLog(path, [{"kind": "train", "step": 1}])  # a resume from a checkpoint of step 1
    assert path.read_bytes() == before
    log.log(kind="train", step=2, loss=float("nan"))
    log.log(kind="eval", step=2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"kind": "train", "step": 1}, {"kind": "train", "step": 2, "loss": None}, {"kind": "eval", "step": 2}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_failed_resume_keeps_the_metrics_and_removes_dead_writers_temporaries(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(kd_args(tiny, out, "--max-steps", "3")) == 0
    metrics = (out / "kd" / "metrics.jsonl").read_bytes()
    assert len(metrics.splitlines()) >= 3
    ckpt = out / "kd" / checkpoint.CHECKPOINT_NAME
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # torn, as by a disk that filled up
    dead, alive = dead_pid(), os.getpid()
    stale = [out / "kd" / f".checkpoint.pt.{dead}.x1y2z3.tmp", out / "kd" / ".checkpoint.pt.legacy01.tmp",
             out / "kd" / f".metrics.jsonl.{dead}.a1b2c3.tmp"]
    live = out / "kd" / f".checkpoint.pt.{alive}.k9k9k9.tmp"  # a write in progress: never removed
    for path in [*stale, live]:
        path.write_bytes(b"partial")
    capsys.readouterr()
    assert main(kd_args(tiny, out, "--resume", "--max-steps", "6")) == 2
    captured = capsys.readouterr()
    assert "not a readable checkpoint" in captured.err
    assert "removed 3 temporary file(s)" in captured.out
    assert (out / "kd" / "metrics.jsonl").read_bytes() == metrics  # was emptied before
    assert not any(path.exists() for path in stale) and live.exists()
    assert not (out / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------ temporaries
def test_a_checkpoint_write_killed_mid_way_leaves_a_temporary_that_names_its_writer(tmp_path):
    writer = python("""
        import os, signal, sys
        from sage_fast.train import checkpoint
        checkpoint.save_atomic({"format": 1, "step": 1}, sys.argv[1])

        def killed(*args):  # SIGKILL after the data is written, before the rename
            os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.os.replace = killed
        checkpoint.save_atomic({"format": 1, "step": 2}, sys.argv[1])
    """, tmp_path / "checkpoint.pt")
    writer.communicate(timeout=120)
    assert writer.returncode == -signal.SIGKILL
    left = list(tmp_path.glob(".checkpoint.pt.*.tmp"))
    assert [p.name.split(".")[3] for p in left] == [str(writer.pid)]
    assert checkpoint.remove_stale_temporaries(tmp_path) == left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert checkpoint.load(tmp_path, required={})["step"] == 1


# ------------------------------------------------------------------------------------------ the lock
HOLD = """
    import sys, time
    from pathlib import Path
    from sage_fast.train.run_lock import RunLock
    with RunLock(sys.argv[1]):
        Path(sys.argv[2]).touch()
        time.sleep(600)
"""


def test_a_live_lock_refuses_and_a_dead_holders_lock_is_taken_over(tmp_path):
    folder, ready = tmp_path / "run", tmp_path / "ready"
    holder = python(HOLD, folder, ready)
    try:
        wait_for(ready, holder)
        with pytest.raises(RunFolderBusy, match=f"in use by another run \\(process {holder.pid} on host "):
            RunLock(folder).acquire()
        holder.kill()  # SIGKILL: no chance to remove the lock file
        holder.wait()
    finally:
        holder.kill()
        holder.communicate()
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == holder.pid
    said = []
    with RunLock(folder, log=said.append):
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(RunFolderBusy, match=f"process {os.getpid()} "):  # one holder per folder, even here
            RunLock(folder).acquire()
    assert said == [f"{folder}: taking over the lock left by process {holder.pid} on host {socket.gethostname()}, "
                    "which is no longer running"]
    assert not (folder / LOCK_NAME).exists()  # removed when released


@pytest.fixture
def without_flock(monkeypatch):
    """A file system without kernel locks (flock fails with ENOLCK, as on some network mounts)."""
    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)


def test_without_kernel_locks_the_lock_file_itself_is_the_lock(tmp_path, without_flock):
    folder = tmp_path / "run"
    with RunLock(folder):
        with pytest.raises(RunFolderBusy, match=f"process {os.getpid()} on host"):
            RunLock(folder).acquire()
    assert not (folder / LOCK_NAME).exists()
    gone = dead_pid()
    (folder / LOCK_NAME).write_text(json.dumps({"pid": gone, "host": socket.gethostname()}))
    said = []
    with RunLock(folder, log=said.append):
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert len(said) == 1 and f"left by process {gone}" in said[0] and "no longer running" in said[0]
    # Another host's process cannot be checked from here: the folder stays refused, with a way out.
    (folder / LOCK_NAME).write_text(json.dumps({"pid": gone, "host": "elsewhere"}))
    with pytest.raises(RunFolderBusy, match=f"process {gone} on host elsewhere"):
        RunLock(folder).acquire()
    (folder / LOCK_NAME).write_text("")
    with pytest.raises(RunFolderBusy, match="remove that file if no run uses the folder"):
        RunLock(folder).acquire()


# ------------------------------------------------------------------------------------------ SIGTERM
WAIT_AT_STEP_3 = """
    import sys, time
    from pathlib import Path
    from sage_fast.train import loop

    go = Path(sys.argv[1])

    def wait_at_step_3(run):  # training is under way: let the test act on this process
        if run.global_step == 3:
            (go.parent / "at_step_3").touch()
            deadline = time.monotonic() + 300
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.02)

    run = loop.run
    loop.run = lambda *args, **kwargs: run(*args, callbacks=[wait_at_step_3], **kwargs)
    from sage_fast.cli import main
    raise SystemExit(main(sys.argv[2:]))
"""


def test_sigterm_checkpoints_a_second_process_is_refused_and_resume_matches(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    args = kd_args(tiny, out, "--epochs", "2", "--log-every", "1")
    first = python(WAIT_AT_STEP_3, tmp_path / "go", *args)
    try:
        wait_for(tmp_path / "at_step_3", first)
        # A second process on the same folder, while the first trains: refused, naming the first.
        second = subprocess.run([sys.executable, "-m", "sage_fast", *args], capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 2, second.stderr
        assert f"in use by another run (process {first.pid} on host" in second.stderr
        assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGTERM)  # what a scheduler sends before pre-empting the job
        (tmp_path / "go").touch()
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 143, err
    assert f"SIGTERM received; interrupted at step 3/{2 * STEPS_PER_EPOCH}" in err and "Traceback" not in err
    assert f"sage-fast distill --resume --output-dir {out}" in err
    state = checkpoint.load(out / "kd")
    assert state["global_step"] == 3 and not state["done"]
    assert [r["step"] for r in records(out / "kd")] == [1, 2, 3]  # the second process wrote nothing
    assert not (out / LOCK_NAME).exists() and not (out / "results.json").exists()

    assert main(["distill", "--resume", "--output-dir", str(out)]) == 0
    straight = tmp_path / "straight"
    assert main(kd_args(tiny, straight, "--epochs", "2", "--log-every", "1")) == 0
    capsys.readouterr()

    def comparable(folder):
        return [{k: v for k, v in r.items() if "seconds" not in k and "share" not in k
                 and k != "examples_per_second"} for r in records(folder)]

    assert comparable(out / "kd") == comparable(straight / "kd")
    assert records(out / "kd")[-1]["kind"] == "final"
    resumed, uninterrupted = checkpoint.load(out / "kd"), checkpoint.load(straight / "kd")
    # The records above match exactly. The weights match to float32 rounding, not bit for bit: the
    # first steps ran in a fresh process and the rest in this one, and the first training run in a
    # process differs from later ones in the last bits (see tests/train/test_loop.py, warm_up), so
    # how many trainings this pytest process ran before decides the last bits.
    for name, tensor in uninterrupted["student"].items():
        torch.testing.assert_close(resumed["student"][name], tensor, rtol=0, atol=1e-5, msg=name)


def test_sigterm_before_training_says_so_and_exits_143(tiny, tmp_path, monkeypatch, capsys):
    def terminated(*args, **kwargs):  # while data and teacher load
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(loop, "build_setup", terminated)
    out = tmp_path / "run"
    assert main(kd_args(tiny, out)) == 143
    err = capsys.readouterr().err
    assert "SIGTERM received; interrupted; continue with: sage-fast distill --resume" in err
    assert not (out / LOCK_NAME).exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is put back


# ------------------------------------------------------------------------------------------ non-finite
def poison_after(step):
    """A callback that sets one element of every trained tensor to NaN after optimiser step ``step``:
    the next loss is NaN."""
    def poison(run):
        if run.global_step == step:
            with torch.no_grad():
                for parameter in run.model.parameters():
                    parameter.view(-1)[0] = float("nan")
    return poison


def test_a_nan_loss_stops_at_the_next_logging_point_and_keeps_the_checkpoint(tiny, tmp_path, monkeypatch,
                                                                               capsys):
    out = tmp_path / "run"
    run = loop.run  # the command's run, with the callback
    monkeypatch.setattr(loop, "run", lambda *args, **kwargs: run(*args, callbacks=[poison_after(STEPS_PER_EPOCH + 2)],
                                                                 **kwargs))
    assert main(kd_args(tiny, out, "--epochs", "2", "--log-every", "2")) == 1
    err = capsys.readouterr().err
    ckpt = out / "kd" / checkpoint.CHECKPOINT_NAME
    assert (f"[kd] the training loss is nan at step {STEPS_PER_EPOCH + 4}: training diverged" in err
            and f"the last checkpoint, of step {STEPS_PER_EPOCH}, is kept unchanged in {ckpt}" in err), err
    assert "Traceback" not in err
    state = checkpoint.load(ckpt)
    assert state["global_step"] == STEPS_PER_EPOCH and not state["done"]
    assert all(torch.isfinite(t).all() for t in state["student"].values() if t.is_floating_point())
    last = records(out / "kd")[-1]
    assert last["kind"] == "error" and last["step"] == STEPS_PER_EPOCH + 4
    assert not (out / "results.json").exists() and not (out / "kd" / "trained").exists()


@pytest.mark.parametrize("poisoned, checkpoint_step",
                         [(STEPS_PER_EPOCH, None), (2 * STEPS_PER_EPOCH, STEPS_PER_EPOCH)],
                         ids=["before the first checkpoint", "before the final test"])
def test_non_finite_weights_between_logging_points_are_never_checkpointed(tiny, tmp_path, poisoned,
                                                                          checkpoint_step):
    out = tmp_path / "run"
    config = resolve({"teacher": str(tiny / "teacher"), "student": "from-teacher:2", "mode": "kd",
                           "train_file": str(tiny / "data.csv"), "epochs": 2, "batch_size": 16, "max_length": 12,
                           "compare": "none", "progress": False, "device": "cpu", "log_every": 1000,
                           "output_dir": str(out), "cache_dir": str(tiny / "cache")})
    with pytest.raises(loop.NonFiniteTraining, match=f"non-finite values after step {poisoned}") as stop:
        loop.run(config, log=lambda *a: None, callbacks=[poison_after(poisoned)])
    if checkpoint_step is None:
        assert "no checkpoint was written before it" in str(stop.value)
        assert not (out / "kd" / checkpoint.CHECKPOINT_NAME).exists()
    else:
        assert checkpoint.load(out / "kd")["global_step"] == checkpoint_step
        assert not (out / "kd" / "trained").exists()
