"""The Trainer's synthesis at scale: ``synthetic_share``, ``synthetic_volume`` and
``label_batch_size``, with the driver's meaning (``sage_fast.synthesis.volume``)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from sage_fast.integrations import hf_trainer  # noqa: E402
from sage_fast.integrations.hf_trainer import SAGEDistillTrainer  # noqa: E402
from sage_fast.integrations.scale import schedule_epoch, trainer_steps  # noqa: E402
from sage_fast.synthesis import SAGESynthesizer  # noqa: E402
from sage_fast.synthesis.volume import rows_per_round, synthetic_rows_per_step  # noqa: E402
from test_hf_trainer import (ROWS, pad_batch, synthesis_settings, tiny_bert, training_args,  # noqa: E402
                             varied_dataset)


def scaled_trainer(tmp_path, *, rows=ROWS, synthesis=None, **kwargs):
    args = dict(max_steps=-1, num_train_epochs=2, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    scale = {k: kwargs.pop(k) for k in ("synthetic_share", "synthetic_volume", "label_batch_size") if k in kwargs}
    args.update(kwargs)
    return SAGEDistillTrainer(
        model=tiny_bert(16, 1, seed=1), teacher=tiny_bert(16, 2, seed=0),
        synthesis=synthesis_settings() if synthesis is None else synthesis, analysis_lag=0,
        args=training_args(tmp_path, **args), train_dataset=varied_dataset(rows), data_collator=pad_batch, **scale)


@pytest.mark.parametrize("args", [
    dict(),                                                       # 10 batches, 2 a step: 5 steps an epoch
    dict(gradient_accumulation_steps=3),                          # a last step of one batch
    dict(per_device_train_batch_size=6, dataloader_drop_last=True),
    dict(max_steps=7),                                            # the steps decide, two epochs begun
    dict(max_steps=3),                                            # shorter than an epoch: its own epoch
    dict(num_train_epochs=1.5),
])
def test_trainer_steps_counts_as_the_trainer_does(tmp_path, args):
    trainer = scaled_trainer(tmp_path, synthesis=synthesis_settings(), **args)
    trainer.train()
    a = trainer.args
    expected = trainer_steps(ROWS, a.per_device_train_batch_size, 1, a.gradient_accumulation_steps,
                             epochs=a.num_train_epochs, max_steps=a.max_steps, drop_last=a.dataloader_drop_last)
    assert expected == (schedule_epoch(trainer.state.max_steps, trainer.state.num_train_epochs),
                        trainer.state.max_steps)
    assert trainer.session.schedule.total_steps == trainer.state.max_steps


def test_trainer_steps_under_several_processes():
    # 41 rows on 2 processes: a distributed sampler gives each 21 (padded), 6 batches of 4
    assert trainer_steps(41, 4, 2, 1, epochs=1) == (6, 6)
    assert trainer_steps(41, 4, 2, 1, epochs=1, drop_last=True) == (5, 5)
    assert trainer_steps(41, 4, 2, 4, epochs=2) == (2, 4)


def test_volume_share_and_label_batch_size_size_the_rounds_and_the_steps(tmp_path, monkeypatch):
    chunks = []
    label_in_chunks = hf_trainer.label_in_chunks

    def recording(forward, vectors, mask, layers, chunk):
        chunks.append((vectors.shape[0], chunk))
        return label_in_chunks(forward, vectors, mask, layers, chunk)

    monkeypatch.setattr(hf_trainer, "label_in_chunks", recording)
    trainer = scaled_trainer(tmp_path, synthetic_volume=3.0, synthetic_share=0.25, label_batch_size=5)
    # 40 rows, 4 a batch, 2 batches a step: 5 steps an epoch, a round after each step (1 = 5 // 3)
    per_round = rows_per_round(3.0, ROWS, 5, 1)
    assert per_round == 24  # 120 rows an epoch over its 5 rounds, more than the pool held
    synth = trainer.synthesizer
    assert synth.config.synthetic_per_round == per_round and synth.config.pool_size == per_round
    # a quarter of each step synthetic: 8 real rows a step take 3 synthetic ones (8 * 1/3, rounded)
    assert trainer.session.settings.synthetic_per_batch == synthetic_rows_per_step(8, 0.25) == 3
    trainer.train()
    assert trainer.session.schedule.interval == 1
    rounds = trainer.sage_rounds
    assert len(rounds) == 9 and {r.synthetic for r in rounds} == {per_round}  # no round after the last step
    assert sum(r.synthetic for r in rounds if r.step <= 5) == 5 * per_round >= 3 * ROWS  # the epoch's volume
    assert chunks and all(chunk == 5 for _, chunk in chunks)
    assert trainer.sage_examples_seen["synthetic"] == 3 * 9  # every step after the first round


def test_the_labelling_batch_defaults_to_the_evaluation_batch(tmp_path):
    trainer = scaled_trainer(tmp_path, per_device_eval_batch_size=7)
    assert trainer.label_batch_size == 7
    assert trainer.synthesizer.config.synthetic_per_round == synthesis_settings().synthetic_per_round


@pytest.mark.parametrize("kwargs,message", [
    (dict(synthetic_share=1.0), r"synthetic_share must be in \[0.0, 1.0\), got 1.0"),
    (dict(synthetic_share=-0.1), "synthetic_share must be in"),
    (dict(synthetic_volume=0), r"synthetic_volume must be in \(0.0, inf\), got 0.0"),
    (dict(synthetic_volume="lots"), "synthetic_volume must be a number"),
    (dict(label_batch_size=0), "label_batch_size must be an integer"),
    (dict(label_batch_size=2.5), "label_batch_size must be an integer"),
    (dict(synthetic_volume=2.0, synthesis="built"), "a built SAGESynthesizer has its size"),
    (dict(synthetic_share=0.5, synthesis=None), "synthetic_share set how synthesis scales, and synthesis is None"),
])
def test_bad_scale_arguments_are_refused_before_the_trainer_is_built(tmp_path, monkeypatch, kwargs, message):
    def built(*args, **kwargs):
        raise AssertionError("the Trainer was built before the arguments were checked")

    settings = dict(model=tiny_bert(16, 1, seed=1), teacher=tiny_bert(16, 2, seed=0), synthesis=synthesis_settings(),
                    args=training_args(tmp_path), train_dataset=varied_dataset(), data_collator=pad_batch)
    settings.update(kwargs)
    if settings["synthesis"] == "built":
        settings["synthesis"] = SAGESynthesizer(synthesis_settings(), num_examples=ROWS, embedding_dim=16)
    monkeypatch.setattr(transformers.Trainer, "__init__", built)
    with pytest.raises(ValueError, match=message):
        SAGEDistillTrainer(**settings)
