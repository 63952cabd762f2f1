import os

import pytest
import torch

from sage_fast.train import checkpoint
from sage_fast.train.checkpoint import CheckpointError, save_atomic


def state(value):
    return {"format": checkpoint.FORMAT_VERSION, "weights": torch.full((3,), float(value))}


def load(path):
    """These tests are about writing and reading whole files, not about what the driver stores."""
    return checkpoint.load(path, required={})


def driver_state():
    return {"format": checkpoint.FORMAT_VERSION, "mode": "kd", "config": {}, "global_step": 3, "epoch": 0,
            "step_in_epoch": 3, "total_steps": 9, "done": False, "examples_seen": {}, "student": {}, "adapter": {},
            "loss": {}, "optimizer": {}, "scheduler": {}, "rng": checkpoint.rng_state(), "metrics": [{"kind": "train"}],
            "timer": {}}


def test_round_trip(tmp_path):
    save_atomic(state(1), tmp_path / "checkpoint.pt")
    assert torch.equal(load(tmp_path)["weights"], torch.ones(3))


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_crash_mid_write_keeps_the_old_checkpoint(tmp_path, monkeypatch, where):
    path = tmp_path / "checkpoint.pt"
    save_atomic(state(1), path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("crash while writing")

    monkeypatch.setattr(checkpoint.os, where, crash)
    with pytest.raises(KeyboardInterrupt):
        save_atomic(state(2), path)
    monkeypatch.undo()
    assert torch.equal(load(path)["weights"], torch.ones(3))
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind


def test_unserialisable_state_never_touches_the_disk(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_atomic(state(1), path)
    with pytest.raises(Exception):
        save_atomic({"format": 1, "bad": lambda: None}, path)
    assert torch.equal(load(path)["weights"], torch.ones(3))


def test_damaged_or_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load(tmp_path)
    torn = tmp_path / "checkpoint.pt"
    save_atomic(state(1), torn)
    torn.write_bytes(torn.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load(torn)
    torch.save({"something": 1}, torn)
    with pytest.raises(CheckpointError, match="not a sage-fast checkpoint"):
        load(torn)


def test_rng_state_round_trip():
    checkpoint.seed_everything(3)
    saved = checkpoint.rng_state()
    a = (torch.rand(2), __import__("numpy").random.rand(), __import__("random").random())
    checkpoint.set_rng_state(saved)
    b = (torch.rand(2), __import__("numpy").random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_a_driver_checkpoint_has_every_entry(tmp_path):
    path = save_atomic(driver_state(), tmp_path / "checkpoint.pt")
    assert checkpoint.load(path)["global_step"] == 3


@pytest.mark.parametrize("key", sorted(checkpoint.REQUIRED))
def test_a_checkpoint_lacking_an_entry_is_refused(tmp_path, key):
    damaged = driver_state()
    del damaged[key]
    path = save_atomic(damaged, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=f"lacks {key}$"):
        checkpoint.load(path)


@pytest.mark.parametrize("key, value", [("mode", 1), ("config", "x"), ("global_step", True), ("global_step", 2.5),
                                        ("student", None)])
def test_a_checkpoint_entry_of_the_wrong_type_is_refused(tmp_path, key, value):
    path = save_atomic({**driver_state(), key: value}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=f"wrong entries {key} "):
        checkpoint.load(path)


@pytest.mark.parametrize("key, value, message", [
    ("mode", "bogus", "mode 'bogus' is none of"), ("global_step", -5, "global_step below 0"),
    ("rng", {"torch": 1}, "random-number states lack python, numpy"), ("metrics", [1, 2], "metrics are not records"),
])
def test_a_checkpoint_with_impossible_entries_is_refused(tmp_path, key, value, message):
    path = save_atomic({**driver_state(), key: value}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(path)


def test_only_temporaries_of_writers_that_are_gone_are_removed(tmp_path, monkeypatch):
    save_atomic(state(1), tmp_path / "checkpoint.pt")
    alive = {os.getpid(), 4242}
    monkeypatch.setattr(checkpoint, "process_alive", lambda pid: pid in alive)
    names = [f".checkpoint.pt.{os.getpid()}.a1.tmp", ".checkpoint.pt.4242.b2.tmp",  # writes in progress
             ".checkpoint.pt.4243.c3.tmp", ".checkpoint.pt.xk_2q9a0.tmp",  # a dead writer; an unnamed (older) one
             ".other.pt.4243.d4.tmp", "notes.tmp"]  # not this checkpoint's
    for name in names:
        (tmp_path / name).write_bytes(b"partial")
    removed = checkpoint.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".checkpoint.pt.4243.c3.tmp", ".checkpoint.pt.xk_2q9a0.tmp"]
    assert sorted(os.listdir(tmp_path)) == sorted(["checkpoint.pt", *names[:2], *names[4:]])
    assert checkpoint.remove_stale_temporaries(tmp_path / "missing") == []
