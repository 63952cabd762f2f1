"""The driver and SAGEDistillTrainer are adapters around one synthesis session: the same settings
plan the same rounds in both, options of the driver included (rounds beside training, the profile
signal, a refreshed profile)."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("umap")
pytest.importorskip("datasets")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

from sage_fast.train import checkpoint, loop  # noqa: E402
from test_hf_trainer import sage_trainer, varied_dataset  # noqa: E402
from test_loop import make_tiny_task, tiny_config  # noqa: E402

SETTINGS = dict(analysis_every=None, analysis_lag=None, profile_signal="disagreement", refresh_profile=True)


def test_the_driver_and_the_trainer_plan_the_same_rounds(tmp_path):
    tiny = make_tiny_task(tmp_path)
    # the driver: 120 training rows of 16 a step, one epoch of 8 steps
    loop.run(tiny_config(tiny, tmp_path / "driver", epochs=1, **SETTINGS), log=lambda *a: None)
    state = checkpoint.load(tmp_path / "driver" / "sage")
    driver = [(r["round"], r["snapshot_step"], r["step"]) for r in state["metrics"] if r["kind"] == "analysis"]
    # the trainer: 64 rows of 8 a step, one epoch of 8 steps
    trainer = sage_trainer(tmp_path / "trainer", dataset=varied_dataset(64), max_steps=-1, num_train_epochs=1,
                           **SETTINGS)
    trainer.train()
    planned = trainer.session.schedule.planned()
    assert planned == [(2, 3), (4, 5), (6, 7)]  # three rounds an epoch, each joining before the next
    assert [(r.round, r.snapshot_step, r.step) for r in trainer.sage_rounds] == driver == \
           [(n + 1, snapshot, join) for n, (snapshot, join) in enumerate(planned)]
    assert trainer.session.settings == loop.session_settings(state_config(state))
    assert trainer.sage_examples_seen["synthetic"] > 0


def state_config(state):
    from sage_fast.train.config import DistillConfig

    return DistillConfig.from_dict(state["config"])
