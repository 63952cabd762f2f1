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


# ---------------------------------------------------------------------------------- with synthesis
from sage_fast.integrations.hf_trainer import STATE_FILE  # noqa: E402
from sage_fast.synthesis import SAGESynthesizer, SynthesisConfig  # noqa: E402

ROWS, BATCH = 40, 8


def varied_dataset(rows=ROWS, ids=None):
    """Rows of 3..8 tokens, unpadded (the collator pads each batch to its longest row)."""
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, LENGTH + 1, (rows,), generator=generator).tolist()
    return datasets.Dataset.from_dict({
        "input_ids": [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in lengths],
        "attention_mask": [[1] * n for n in lengths],
        "labels": torch.randint(0, 2, (rows,), generator=generator).tolist(),
        "example_id": list(range(rows)) if ids is None else ids,
    })


def pad_batch(features):
    width = max(len(f["input_ids"]) for f in features)
    batch = {key: torch.tensor([f[key] + [0] * (width - len(f[key])) for f in features])
             for key in ("input_ids", "attention_mask", "token_type_ids") if key in features[0]}
    batch["labels"] = torch.tensor([f["labels"] for f in features])
    batch["example_id"] = torch.tensor([f["example_id"] for f in features])
    return batch


def synthesis_settings(**overrides):
    return SynthesisConfig(**{"synthetic_per_round": 8, "pool_size": 16, "n_neighbors": 5, "seed": 0, **overrides})


def sage_trainer(tmp_path, *, teacher=None, student=None, loss=None, dataset=None, synthesis=None, loss_maps=False,
                 analysis_every=2, analysis_lag=0, profile_signal="loss", refresh_profile=False, **args):
    settings = dict(max_steps=6, per_device_train_batch_size=BATCH, save_strategy="no")
    settings.update(args)
    return SAGEDistillTrainer(
        model=student or tiny_bert(16, 1, seed=1), teacher=teacher or tiny_bert(16, 2, seed=0),
        loss=loss or SAGELossConfig(), synthesis=synthesis or synthesis_settings(), synthetic_per_batch=4,
        analysis_every=analysis_every, analysis_lag=analysis_lag, profile_signal=profile_signal,
        refresh_profile=refresh_profile, loss_maps=loss_maps,
        args=training_args(tmp_path, **settings),
        train_dataset=dataset or varied_dataset(), data_collator=pad_batch)


def count_rows_in_the_loss(trainer):
    """(rows, rows without a label) of every batch the loss computes, recorded as it is called."""
    seen, forward = [], trainer.sage_loss.forward

    def counting(student_outputs, teacher_outputs, labels=None, attention_mask=None):
        seen.append((int(student_outputs["logits"].shape[0]), int((labels == -100).sum())))
        return forward(student_outputs, teacher_outputs, labels=labels, attention_mask=attention_mask)

    trainer.sage_loss.forward = counting
    return seen


def test_a_trainer_is_freed_with_its_last_name_not_at_a_later_collection(tmp_path):
    """No reference cycle through the synthesis callback: a trainer that is no longer named is
    freed at once, with its model (and under torchrun its DDP wrapper and process group), not at
    some later garbage collection, which may come only at interpreter exit."""
    import gc
    import weakref

    trainer = sage_trainer(tmp_path)
    trainer.train()
    freed = weakref.ref(trainer)
    gc.disable()
    try:
        del trainer
        assert freed() is None
    finally:
        gc.enable()


def test_synthetic_rows_reach_the_loss(tmp_path):
    trainer = sage_trainer(tmp_path)
    teacher_table = trainer.teacher.get_input_embeddings().weight
    student_table = trainer.model.get_input_embeddings().weight
    assert torch.equal(student_table, teacher_table) and not student_table.requires_grad
    seen = count_rows_in_the_loss(trainer)

    trainer.train()

    # Rounds after steps 2 and 4 (not after the last); 4 synthetic rows in each later batch.
    assert seen == [(8, 0), (8, 0)] + [(12, 4)] * 4
    assert trainer.sage_examples_seen == {"real": 48, "synthetic": 16}
    synth = trainer.synthesizer
    assert synth.rounds == 2 and len(synth.pool) == 16 and synth.seen == ROWS
    assert [r.step for r in trainer.sage_rounds] == [2, 4] and trainer.sage_rounds[1].pool_size == 16
    assert any("sage_round" in entry for entry in trainer.state.log_history)
    # What the pool holds is the teacher's own verdict on the synthetic vectors.
    with torch.no_grad():
        logits = trainer.teacher(inputs_embeds=synth.pool.vectors, attention_mask=synth.pool.masks).logits
    torch.testing.assert_close(logits, synth.pool.logits)
    assert torch.equal(trainer.model.get_input_embeddings().weight, teacher_table)


def test_same_label_rows_carry_their_gold_label_into_the_loss_and_boundary_gets_classes(tmp_path):
    trainer = sage_trainer(tmp_path, synthesis=synthesis_settings(partners="same-label"))
    seen = count_rows_in_the_loss(trainer)
    trainer.train()
    synth = trainer.synthesizer
    gold = torch.tensor(varied_dataset()["labels"])
    assert torch.equal(synth.classes, gold)  # observe was given each row's gold label
    labels = synth.pool.labels[:len(synth.pool)]
    assert int((labels >= 0).sum()) > 0
    # batches with 4 synthetic rows each, of which those with a gold label are no longer ignored
    assert [rows for rows, _ in seen] == [8, 8, 12, 12, 12, 12]
    assert all(ignored <= 4 for _, ignored in seen[2:]) and any(ignored < 4 for _, ignored in seen[2:])

    boundary = sage_trainer(tmp_path / "boundary", synthesis=synthesis_settings(partners="boundary"))
    boundary.train()
    assert bool((boundary.synthesizer.classes >= 0).all())  # the teacher's predictions, for boundary partners


def test_rounds_come_three_an_epoch_by_default(tmp_path):
    steps_per_epoch = ROWS // BATCH
    trainer = sage_trainer(tmp_path, analysis_every=None, max_steps=-1, num_train_epochs=2)
    trainer.train()
    every = steps_per_epoch // 3
    assert [r.step for r in trainer.sage_rounds] == list(range(every, 2 * steps_per_epoch, every))


def test_synthesis_with_hidden_state_alignment(tmp_path):
    loss = SAGELossConfig(beta=0.5, layer_map={1: 2}, num_student_layers=1, num_teacher_layers=2)
    trainer = sage_trainer(tmp_path, loss=loss, max_steps=4, loss_maps=True)
    seen = count_rows_in_the_loss(trainer)
    trainer.train()
    assert seen[-1] == (12, 4) and set(trainer.synthesizer.pool.hidden) == {2}
    assert trainer.synthesizer.pool.hidden[2].dtype == torch.float16
    assert trainer.sage_rounds[0].png == str(tmp_path / "loss_maps" / "round001.png")
    assert (tmp_path / "loss_maps" / "round001.png").is_file()


def test_a_resumed_trainer_keeps_the_pool_and_continues_the_run(tmp_path):
    straight = sage_trainer(tmp_path / "straight", save_strategy="steps", save_steps=3)
    straight.train()
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    assert (checkpoint / STATE_FILE).is_file()

    class PoolAtStart(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.size = len(resumed.synthesizer.pool)
            self.rounds = resumed.synthesizer.rounds

    resumed = sage_trainer(tmp_path / "resumed", save_strategy="steps", save_steps=3)
    at_start = PoolAtStart()
    resumed.add_callback(at_start)
    seen = count_rows_in_the_loss(resumed)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert (at_start.size, at_start.rounds) == (8, 1)  # the round after step 2, restored
    assert seen == [(12, 4)] * 3  # steps 4, 5, 6 train on synthetic rows at once
    assert resumed.sage_examples_seen == straight.sage_examples_seen == {"real": 48, "synthetic": 16}
    assert resumed.synthesizer.rounds == 2
    assert torch.equal(resumed.synthesizer.pool.vectors, straight.synthesizer.pool.vectors)
    assert torch.equal(resumed.synthesizer.profile.loss, straight.synthesizer.profile.loss)
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_resuming_needs_sage_state(tmp_path):
    plain = SAGEDistillTrainer(model=tiny_bert(16, 1, seed=1), teacher=tiny_bert(16, 2, seed=0),
                               args=training_args(tmp_path / "plain", save_strategy="steps", save_steps=3,
                                                  max_steps=3), train_dataset=toy_dataset())
    plain.train()
    assert (tmp_path / "plain" / "checkpoint-3" / STATE_FILE).is_file()  # projections are kept too
    with pytest.raises(ValueError, match="saved without synthesis"):
        sage_trainer(tmp_path / "again").train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-3"))
    (tmp_path / "plain" / "checkpoint-3" / STATE_FILE).unlink()
    with pytest.raises(ValueError, match=f"holds no {STATE_FILE}"):
        sage_trainer(tmp_path / "again").train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-3"))


def test_synthesis_needs_row_positions_as_ids(tmp_path):
    shifted = varied_dataset(ids=list(range(100, 100 + ROWS)))
    with pytest.raises(ValueError, match="ids must lie in"):
        sage_trainer(tmp_path, dataset=shifted).train()
    without_ids = varied_dataset().remove_columns("example_id").add_column("other", list(range(ROWS)))
    trainer = sage_trainer(tmp_path, dataset=without_ids)
    trainer.data_collator = lambda rows: {k: v for k, v in pad_batch([{**r, "example_id": 0} for r in rows]).items()
                                          if k != "example_id"}
    with pytest.raises(ValueError, match="needs the batch's 'example_id' column"):
        trainer.train()


@pytest.mark.parametrize("kwargs,message", [
    (dict(synthesis="sage"), "synthesis must be None, a SynthesisConfig or a SAGESynthesizer"),
    (dict(synthetic_per_batch=True), "synthetic_per_batch must be an integer"),
    (dict(analysis_every=0), "analysis_every must be an integer in"),
    (dict(model=tiny_bert(32, 1, seed=1)), "the student's input table is \\(64, 32\\), the teacher's \\(64, 16\\)"),
    (dict(synthesis="elsewhere"), "the synthesizer lives on cuda:3 but the trainer trains on cpu"),
])
def test_bad_synthesis_arguments(tmp_path, kwargs, message):
    settings = dict(model=tiny_bert(16, 1, seed=1), teacher=tiny_bert(16, 2, seed=0), synthesis=synthesis_settings(),
                    args=training_args(tmp_path), train_dataset=varied_dataset(), data_collator=pad_batch)
    settings.update(kwargs)
    if settings["synthesis"] == "elsewhere":  # a synthesizer built for another device than the trainer's
        settings["synthesis"] = SAGESynthesizer(synthesis_settings(), num_examples=ROWS, embedding_dim=16)
        settings["synthesis"].device = torch.device("cuda:3")
    with pytest.raises(ValueError, match=message):
        SAGEDistillTrainer(**settings)


@pytest.mark.slow
def test_packaged_minilm_trains_on_synthetic_rows_and_resumes_with_its_pool(tmp_path):
    """The packaged MiniLM as teacher, a 2-layer student from its layers, 48 real snippets."""
    from sage_fast.assets import minilm_path, read_rotten_tomatoes
    from sage_fast.train.models import student_from_teacher

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    rows = read_rotten_tomatoes()[:48]
    encoded = tokenizer([text for text, _, _ in rows], truncation=True, max_length=24)
    dataset = datasets.Dataset.from_dict({**encoded, "labels": [label for _, label, _ in rows],
                                          "example_id": list(range(len(rows)))})

    def models():
        torch.manual_seed(0)  # the classification head is new: the same one for both runs
        teacher = transformers.AutoModelForSequenceClassification.from_pretrained(
            minilm_path(), num_labels=2, local_files_only=True)
        return teacher, student_from_teacher(teacher, every_k=3)

    def trainer(out):
        teacher, student = models()
        return sage_trainer(out, teacher=teacher, student=student, dataset=dataset, save_strategy="steps",
                            save_steps=3, learning_rate=1e-4)

    straight = trainer(tmp_path / "straight")
    seen = count_rows_in_the_loss(straight)
    straight.train()
    assert seen == [(8, 0), (8, 0)] + [(12, 4)] * 4
    assert straight.sage_examples_seen == {"real": 48, "synthetic": 16} and straight.synthesizer.rounds == 2
    assert straight.synthesizer.pool.vectors.shape[2] == 384

    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-3"))
    assert resumed.sage_rounds[0].round == 2 and resumed.sage_rounds[0].pool_size == 16  # round 1 came back
    assert torch.equal(resumed.synthesizer.pool.vectors, straight.synthesizer.pool.vectors)
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("mode", ["sage", "random"])
@pytest.mark.parametrize("generator", ["substitute", "boundary"])
def test_every_generator_is_a_trainer_option_under_every_placement(tmp_path, generator, mode):
    settings = {"substitute": dict(substitute_share=0.5, substitute_top_k=3), "boundary": dict(boundary_steps=2)}
    synthesis = synthesis_settings(generator=generator, mode=mode, **settings[generator])
    trainer = sage_trainer(tmp_path, synthesis=synthesis)
    seen = count_rows_in_the_loss(trainer)
    trainer.train()
    synth = trainer.synthesizer
    assert seen == [(8, 0), (8, 0)] + [(12, 4)] * 4 and synth.rounds == 2 and len(synth.pool) == 16
    vectors, masks = synth.pool.vectors[:16], synth.pool.masks[:16]
    with torch.no_grad():
        logits = trainer.teacher(inputs_embeds=vectors, attention_mask=masks).logits
    torch.testing.assert_close(logits, synth.pool.logits[:16])  # labelled by the teacher where they ended
    table = trainer.teacher.get_input_embeddings().weight
    on_table = (vectors[masks.bool()].unsqueeze(1) == table.unsqueeze(0)).all(dim=-1).any(dim=1)
    if generator == "substitute":  # every token of every row is a row of the teacher's table: real tokens
        assert bool(on_table.all())
    else:  # stepped off the table, and the student's table is untouched
        assert not bool(on_table.any())
        assert torch.equal(trainer.model.get_input_embeddings().weight, table)

