"""Real and synthetic rows in one batch: as the teacher's vectors, or as token ids for a student
that keeps its own table (``sage_fast.integrations.batches``)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from sage_fast.integrations.batches import mixed_batch, reads_tokens, student_inputs  # noqa: E402
from sage_fast.synthesis import SyntheticRows  # noqa: E402
from test_hf_trainer import (BATCH, VOCAB, count_rows_in_the_loss, sage_trainer, synthesis_settings,  # noqa: E402
                             tiny_bert)

SUBSTITUTE = dict(generator="substitute", substitute_share=0.5, substitute_top_k=3)


def tiny_roberta(seed):
    torch.manual_seed(seed)
    config = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=32, max_position_embeddings=16, num_labels=2,
                                        pad_token_id=1, type_vocab_size=1)
    return transformers.RobertaForSequenceClassification(config).eval()


def rows_of(ids, mask, logits_width=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SyntheticRows(torch.randn(*ids.shape, 16, generator=g), mask, torch.randn(ids.shape[0], logits_width,
                                                                                      generator=g), tokens=ids)


@pytest.mark.parametrize("make", [lambda: tiny_bert(16, 1, seed=3).eval(), lambda: tiny_roberta(3)])
def test_token_rows_give_what_the_same_rows_as_vectors_give_a_student_of_the_teacher_s_table(make):
    """Mixed as token ids or as the teacher's vectors, the same rows give the same logits when the
    student reads the teacher's table: the padding, the position ids and the rows' order agree."""
    student = make()
    teacher = make()
    teacher.get_input_embeddings().weight.data.copy_(student.get_input_embeddings().weight)
    g = torch.Generator().manual_seed(0)
    real_ids = torch.randint(3, VOCAB, (3, 5), generator=g)
    real_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    real_ids = torch.where(real_mask.bool(), real_ids, 1)
    synthetic_ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    synthetic_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])
    synthetic_ids = synthetic_ids * synthetic_mask  # the pool pads with 0, which is not RoBERTa's pad
    with torch.no_grad():
        synthetic = rows_of(synthetic_ids, synthetic_mask)
        synthetic.vectors = teacher.get_input_embeddings()(synthetic_ids)
        inputs = {"input_ids": real_ids, "attention_mask": real_mask}
        teacher_outputs = {"logits": torch.randn(3, 2, generator=g)}
        logits = []
        for tokens in (True, False):
            batch = mixed_batch(inputs, teacher, teacher_outputs, None, synthetic, (), -100, tokens=tokens)
            assert batch.n_real == 3 and tuple(batch.mask.shape) == (5, 7)
            logits.append(student(**student_inputs(student, batch, tokens=tokens)).logits)
            if tokens:
                ids = student_inputs(student, batch, tokens=True)["input_ids"]
                pad = student.config.pad_token_id
                assert bool((ids[batch.mask == 0] == pad).all()) and torch.equal(ids[3:][synthetic_mask.bool()],
                                                                                  synthetic_ids[synthetic_mask.bool()])
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_a_student_of_another_width_trains_on_substituted_token_rows_with_its_own_table(tmp_path):
    student = tiny_bert(8, 1, seed=1)  # half the teacher's width, the teacher's vocabulary
    table_before = student.get_input_embeddings().weight.detach().clone()
    trainer = sage_trainer(tmp_path, student=student, synthesis=synthesis_settings(**SUBSTITUTE))
    assert trainer.reads_tokens
    seen = count_rows_in_the_loss(trainer)
    calls = []
    trainer.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    trainer.train()

    synth = trainer.synthesizer
    assert seen == [(BATCH, 0), (BATCH, 0)] + [(BATCH + 4, 4)] * 4 and synth.pool.tokens is not None
    table = trainer.model.get_input_embeddings().weight
    assert table.requires_grad and not torch.equal(table.detach(), table_before)  # its own table, trained
    mixed = [kwargs for kwargs in calls if kwargs["input_ids"].shape[0] == BATCH + 4]
    assert len(mixed) == 4 and all("inputs_embeds" not in kwargs for kwargs in calls)
    pool_rows = {tuple(row[mask.bool()].tolist()) for row, mask in zip(synth.pool.tokens, synth.pool.masks)}
    for kwargs in mixed:  # the rows after the real ones are pool rows, as token ids
        for row, mask in zip(kwargs["input_ids"][BATCH:], kwargs["attention_mask"][BATCH:]):
            assert tuple(row[mask.bool()].tolist()) in pool_rows
    with torch.no_grad():  # labelled by the teacher on the very tokens the student reads
        logits = trainer.teacher(input_ids=synth.pool.tokens, attention_mask=synth.pool.masks).logits
    torch.testing.assert_close(logits, synth.pool.logits, rtol=1e-5, atol=1e-5)


def test_which_students_read_which_rows():
    teacher = tiny_bert(16, 2, seed=0)
    assert reads_tokens("substitute", tiny_bert(8, 1, seed=1), teacher)
    assert reads_tokens("substitute", tiny_bert(16, 1, seed=1), teacher)  # its own table, not the teacher's
    assert not reads_tokens("interpolate", tiny_bert(16, 1, seed=1), teacher)
    with pytest.raises(ValueError, match="generator 'boundary' makes vectors; generator 'substitute' makes token ids"):
        reads_tokens("boundary", tiny_bert(8, 1, seed=1), teacher)
    other_vocabulary = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB + 5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match=f"teacher's vocabulary \\({VOCAB} tokens\\).*has {VOCAB + 5}"):
        reads_tokens("substitute", other_vocabulary, teacher)


def test_token_rows_need_token_ids_in_the_pool():
    teacher = tiny_bert(16, 2, seed=0)
    ids, mask = torch.ones(2, 4, dtype=torch.int64), torch.ones(2, 4, dtype=torch.int64)
    rows = rows_of(ids, mask)
    rows.tokens = None
    with pytest.raises(ValueError, match="the synthetic rows have no token ids"):
        mixed_batch({"input_ids": ids, "attention_mask": mask}, teacher, {"logits": torch.zeros(2, 2)}, None, rows,
                    (), -100, tokens=True)
