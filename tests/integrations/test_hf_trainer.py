import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from sage_fast.integrations.hf_trainer import SAGEDistillTrainer  # noqa: E402
from sage_fast.nn.sage_loss import SAGELoss, SAGELossConfig  # noqa: E402

VOCAB, LENGTH, EXAMPLES = 64, 8, 12


def tiny_bert(hidden_size, layers, seed):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden_size, max_position_embeddings=LENGTH, num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


def toy_dataset(with_ids=True):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, VOCAB, (EXAMPLES, LENGTH), generator=generator)
    lengths = torch.randint(3, LENGTH + 1, (EXAMPLES,), generator=generator)
    attention_mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    columns = {
        "input_ids": (input_ids * attention_mask).tolist(),
        "attention_mask": attention_mask.tolist(),
        "labels": torch.randint(0, 2, (EXAMPLES,), generator=generator).tolist(),
    }
    if with_ids:
        columns["example_id"] = list(range(100, 100 + EXAMPLES))
    return datasets.Dataset.from_dict(columns)


def training_args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                    per_device_eval_batch_size=4, learning_rate=1e-3, report_to=[], use_cpu=True,
                    save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_trains_student_against_frozen_teacher_with_alignment(tmp_path):
    teacher, student = tiny_bert(32, 2, seed=0), tiny_bert(16, 1, seed=1)
    config = SAGELossConfig(beta=0.5, cosine_weight=0.5, layer_map={1: 2}, num_student_layers=1,
                            num_teacher_layers=2, student_hidden_size=16, teacher_hidden_size=32)
    calls = []
    trainer = SAGEDistillTrainer(model=student, teacher=teacher, loss=config,
                                 on_per_example=lambda ids, losses: calls.append((ids, losses)),
                                 args=training_args(tmp_path), train_dataset=toy_dataset())
    teacher_before, student_before = snapshot(teacher), snapshot(student)
    projections_before = snapshot(trainer.sage_loss)

    trainer.train()

    assert all(torch.equal(teacher_before[n], p) for n, p in teacher.named_parameters())
    assert not teacher.training
    assert any(not torch.equal(student_before[n], p) for n, p in student.named_parameters())
    assert any(not torch.equal(projections_before[n], p) for n, p in trainer.sage_loss.named_parameters())
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)

    assert len(calls) == 3
    for ids, per_example in calls:
        assert ids.dtype == torch.int64 and ids.shape == (4,)
        assert bool(((ids >= 100) & (ids < 100 + EXAMPLES)).all())
        assert per_example.shape == (4,) and not per_example.requires_grad
        assert bool(torch.isfinite(per_example).all())


def test_loss_decreases_on_a_fixed_batch(tmp_path):
    teacher, student = tiny_bert(16, 1, seed=0), tiny_bert(16, 1, seed=2)
    first_batch = toy_dataset().select(range(4))
    seen = []
    trainer = SAGEDistillTrainer(model=student, teacher=teacher, loss=SAGELossConfig(alpha=1.0),
                                 on_per_example=lambda ids, losses: seen.append(float(losses.mean())),
                                 args=training_args(tmp_path, max_steps=8, learning_rate=3e-3),
                                 train_dataset=first_batch)
    trainer.train()
    assert len(seen) == 8
    assert seen[-1] < seen[0]


def test_without_example_ids_and_evaluation(tmp_path):
    teacher, student = tiny_bert(16, 1, seed=0), tiny_bert(16, 1, seed=1)
    calls = []
    trainer = SAGEDistillTrainer(model=student, teacher=teacher, loss=SAGELoss(SAGELossConfig()),
                                 on_per_example=lambda ids, losses: calls.append(ids),
                                 args=training_args(tmp_path, max_steps=1),
                                 train_dataset=toy_dataset(with_ids=False), eval_dataset=toy_dataset())
    trainer.train()
    assert calls == [None]
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    assert len(calls) == 1, "the per-example hook runs on training steps only"


@pytest.mark.parametrize("kwargs,message", [
    (dict(teacher="bert"), "teacher must be a torch.nn.Module"),
    (dict(loss={"alpha": 0.5}), "loss must be a SAGELossConfig or a SAGELoss"),
    (dict(on_per_example=3), "on_per_example must be callable"),
    (dict(example_id_column=""), "example_id_column must be a non-empty str"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    settings = dict(model=tiny_bert(16, 1, seed=0), teacher=tiny_bert(16, 1, seed=1),
                    args=training_args(tmp_path))
    settings.update(kwargs)
    with pytest.raises(ValueError, match=message):
        SAGEDistillTrainer(**settings)
