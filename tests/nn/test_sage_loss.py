import pytest
import torch

transformers = pytest.importorskip("transformers")

from sage_fast.nn.sage_loss import SAGELoss, SAGELossConfig, SAGELossOutput  # noqa: E402

N, L = 5, 7


def tiny_bert(hidden, layers, seed):
    torch.manual_seed(seed)
    config = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                     intermediate_size=2 * hidden, vocab_size=100, max_position_embeddings=32)
    return transformers.BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def models():
    return tiny_bert(32, 4, seed=0), tiny_bert(16, 2, seed=1)


def make_batch():
    ids = torch.randint(0, 100, (N, L))
    mask = torch.ones(N, L, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    labels = torch.tensor([0, 1, -100, 1, -100])  # rows 2 and 4 are synthetic: no label
    return ids, mask, labels


@pytest.fixture
def seeded_batch(seed):
    return make_batch()


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return make_batch()


def run_models(models, ids, mask):
    teacher, student = models
    with torch.no_grad():
        teacher_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    student_out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return student_out, teacher_out


def make_config(**overrides):
    base = dict(alpha=0.4, temperature=2.0, beta=0.7, mse_weight=1.0, cosine_weight=0.5, num_student_layers=2,
                num_teacher_layers=4, student_hidden_size=16, teacher_hidden_size=32, layer_weights={1: 0.5})
    return SAGELossConfig(**{**base, **overrides})


def expected_float64(loss_module, student_out, teacher_out, labels, mask):
    """The SAGE loss written out by hand in float64."""
    cfg = loss_module.config
    T = cfg.temperature
    s_logits, t_logits = student_out.logits.double(), teacher_out.logits.double()
    log_ps, log_pt = torch.log_softmax(s_logits / T, 1), torch.log_softmax(t_logits / T, 1)
    kd = cfg.alpha * T * T * (log_pt.exp() * (log_pt - log_ps)).sum(1)
    labelled = labels != cfg.ignore_index
    ce = -torch.log_softmax(s_logits, 1).gather(1, labels.clamp(min=0)[:, None])[:, 0]
    kd = kd + (1 - cfg.alpha) * torch.where(labelled, ce, 0.0)
    valid = mask.double()
    align = torch.zeros(N, dtype=torch.float64)
    for s_index, t_index in loss_module.layer_map.items():
        h_s = student_out.hidden_states[s_index].double()
        proj = loss_module.projections[str(s_index)]
        h_s = h_s @ proj.weight.double().t() + proj.bias.double()
        h_t = teacher_out.hidden_states[t_index].double()
        mse = ((h_s - h_t) ** 2).mean(-1)
        cos = (h_s * h_t).sum(-1) / (h_s.norm(dim=-1).clamp(min=1e-8) * h_t.norm(dim=-1).clamp(min=1e-8))
        token = cfg.mse_weight * mse + cfg.cosine_weight * (1 - cos)
        align = align + loss_module.layer_weights[s_index] * (token * valid).sum(1) / valid.sum(1)
    return kd, align


def test_matches_hand_written_float64(models, seeded_batch):
    ids, mask, labels = seeded_batch
    loss_module = SAGELoss(make_config())
    student_out, teacher_out = run_models(models, ids, mask)
    out = loss_module(student_out, teacher_out, labels=labels, attention_mask=mask)
    kd, align = expected_float64(loss_module, student_out, teacher_out, labels, mask)
    assert isinstance(out, SAGELossOutput)
    torch.testing.assert_close(out.kd_per_example.double(), kd, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.align_per_example.double(), align, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.per_example.double(), kd + 0.7 * align, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss.double(), (kd + 0.7 * align).mean(), atol=1e-5, rtol=1e-5)
    assert out.per_example.dtype == torch.float32 and not out.per_example.requires_grad


def test_gradients_reach_student_and_projections_not_teacher(models, batch):
    ids, mask, labels = batch
    teacher, student = models
    loss_module = SAGELoss(make_config())
    student.zero_grad(set_to_none=True)
    teacher_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)  # graph kept on purpose
    student_out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    out = loss_module(student_out, teacher_out, labels=labels, attention_mask=mask)
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in loss_module.parameters())
    assert student.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert student.classifier.weight.grad.abs().sum() > 0

    # the same gradients as autograd through the hand-written loss, for the projections and the student
    student_out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    params = list(loss_module.parameters()) + [student.classifier.weight,
                                               student.bert.encoder.layer[0].attention.self.query.weight]
    grads = torch.autograd.grad(loss_module(student_out, teacher_out, labels=labels, attention_mask=mask).loss,
                                params, retain_graph=True)
    kd, align = expected_float64(loss_module, student_out, teacher_out, labels, mask)
    ref_grads = torch.autograd.grad((kd + 0.7 * align).mean(), params)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-4)


def test_cached_teacher_mapping_equals_tuple(models, batch):
    ids, mask, labels = batch
    loss_module = SAGELoss(make_config())
    student_out, teacher_out = run_models(models, ids, mask)
    assert loss_module.teacher_layers_needed == (2, 4)
    cached = {"logits": teacher_out.logits,
              "hidden_states": {i: teacher_out.hidden_states[i] for i in loss_module.teacher_layers_needed}}
    full = loss_module(student_out, teacher_out, labels=labels, attention_mask=mask)
    from_cache = loss_module(dict(student_out), cached, labels=labels, attention_mask=mask)
    torch.testing.assert_close(from_cache.loss, full.loss, rtol=0, atol=0)
    torch.testing.assert_close(from_cache.per_example, full.per_example, rtol=0, atol=0)


def test_synthetic_rows_have_no_cross_entropy(models, batch):
    ids, mask, labels = batch
    student_out, teacher_out = run_models(models, ids, mask)
    kd_only = SAGELoss(make_config(alpha=1.0, beta=0.0))(student_out, teacher_out)
    with_ce = SAGELoss(make_config(alpha=0.3, beta=0.0))(student_out, teacher_out, labels=labels)
    synthetic = labels == -100
    # with alpha = 0.3 an unlabelled row is 0.3 of the pure-KL row: no CE term was added
    torch.testing.assert_close(with_ce.kd_per_example[synthetic], 0.3 * kd_only.kd_per_example[synthetic])
    assert (with_ce.kd_per_example[~synthetic] > 0.3 * kd_only.kd_per_example[~synthetic]).all()
    assert with_ce.align_per_example is None


def test_default_layer_map_and_identity_projection():
    cfg = SAGELossConfig(beta=1.0, num_student_layers=4, num_teacher_layers=6)
    assert cfg.resolved_layer_map() == {1: 2, 2: 3, 3: 5, 4: 6}
    loss_module = SAGELoss(cfg)
    assert len(loss_module.projections) == 0 and loss_module.teacher_layers_needed == (2, 3, 5, 6)
    assert SAGELoss(SAGELossConfig(beta=1.0, num_student_layers=2, num_teacher_layers=4)).layer_map == {1: 2, 2: 4}
    assert SAGELoss(SAGELossConfig()).teacher_layers_needed == ()


def test_same_hidden_size_aligns_without_projection():
    torch.manual_seed(0)
    h_s = [torch.randn(2, 3, 8, requires_grad=True) for _ in range(3)]
    h_t = [torch.randn(2, 3, 8) for _ in range(3)]
    logits = torch.randn(2, 4, requires_grad=True)
    loss_module = SAGELoss(SAGELossConfig(beta=2.0, layer_map={0: 0, 2: 2}))
    out = loss_module({"logits": logits, "hidden_states": h_s}, {"logits": torch.randn(2, 4), "hidden_states": h_t})
    out.loss.backward()
    assert h_s[1].grad is None and h_s[0].grad is not None and h_s[2].grad is not None


def test_half_precision_student_with_float32_cached_teacher():
    torch.manual_seed(0)
    h_s = [torch.randn(3, 4, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    h_t = {2: torch.randn(3, 4, 8)}
    logits = torch.randn(3, 5, dtype=torch.bfloat16, requires_grad=True)
    loss_module = SAGELoss(SAGELossConfig(beta=1.0, cosine_weight=1.0, layer_map={2: 2}))
    out = loss_module({"logits": logits, "hidden_states": h_s}, {"logits": torch.randn(3, 5), "hidden_states": h_t},
                      labels=torch.tensor([1, -100, 4]))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.per_example.dtype == torch.float32
    assert h_s[2].grad.dtype == torch.bfloat16 and logits.grad is not None


@pytest.mark.parametrize("overrides, message", [
    (dict(alpha=1.5), "alpha"),
    (dict(temperature=0.0), "temperature"),
    (dict(beta=-1.0), "beta"),
    (dict(mse_weight=0.0, cosine_weight=0.0), "both 0"),
    (dict(layer_map=None, num_student_layers=None), "num_student_layers"),
    (dict(layer_map={5: 1}), "student index 5 is out of range"),
    (dict(layer_map={1: 9}), "teacher index 9 is out of range"),
    (dict(layer_map={}), "non-empty"),
    (dict(beta=0.0, layer_map={1: -2}), "non-negative"),
    (dict(layer_weights={2: -1.0}), "layer_weights[2]"),
    (dict(layer_weights={7: 1.0}), "not in the layer map"),
    (dict(teacher_hidden_size=None), "given together"),
    (dict(num_teacher_layers=0), "num_teacher_layers"),
    (dict(ignore_index=1.5), "ignore_index"),
])
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_config(**overrides)


def test_missing_outputs_raise(models, batch):
    ids, mask, labels = batch
    student_out, teacher_out = run_models(models, ids, mask)
    loss_module = SAGELoss(make_config())
    with pytest.raises(ValueError, match="output_hidden_states"):
        loss_module({"logits": student_out.logits}, teacher_out)
    with pytest.raises(ValueError, match="no entry for teacher index 4"):
        loss_module(student_out, {"logits": teacher_out.logits, "hidden_states": {2: teacher_out.hidden_states[2]}})
    with pytest.raises(ValueError, match="config"):
        SAGELoss({"beta": 1.0})


def float64_kd(student_logits, teacher_logits, labels, cfg):
    T = cfg.temperature
    s, t = student_logits.double(), teacher_logits.double()
    log_ps, log_pt = torch.log_softmax(s / T, 1), torch.log_softmax(t / T, 1)
    kd = cfg.alpha * T * T * (log_pt.exp() * (log_pt - log_ps)).sum(1)
    labelled = labels != cfg.ignore_index
    ce = -torch.log_softmax(s, 1).gather(1, labels.clamp(min=0)[:, None])[:, 0]
    return kd + (1 - cfg.alpha) * torch.where(labelled, ce, 0.0)


@pytest.mark.parametrize("n_classes", [2, 50])
def test_float16_student_with_float32_teacher_beyond_float16_range(n_classes, seed):
    # finite float32 teacher logits of +-1e5 would be infinities in float16: the loss reads the teacher
    # in its own dtype, so nothing overflows and nobody is blamed for values they never had
    cfg = SAGELossConfig(alpha=0.5, temperature=2.0)
    student_logits = (torch.randn(6, n_classes) * 4).half().requires_grad_(True)
    teacher_logits = torch.randn(6, n_classes) * 1e5
    teacher_logits[0, 0] = 1e5
    labels = torch.tensor([0, 1, -100, 1, 0, -100])
    out = SAGELoss(cfg)({"logits": student_logits}, {"logits": teacher_logits}, labels=labels)
    expected = float64_kd(student_logits.detach(), teacher_logits, labels, cfg)
    assert torch.isfinite(out.loss) and torch.isfinite(out.per_example).all()
    torch.testing.assert_close(out.kd_per_example.double(), expected, rtol=1e-5, atol=1e-3)
    out.loss.backward()
    assert student_logits.grad.dtype == torch.float16 and torch.isfinite(student_logits.grad).all()


def test_float16_student_with_float32_teacher_hidden_states_beyond_float16_range(seed):
    # the same for the alignment term: a float16 student is aligned in float32 with a wider teacher
    cfg = SAGELossConfig(beta=1.0, mse_weight=1.0, cosine_weight=0.5, layer_map={1: 1})
    h_s = [torch.randn(3, 4, 8).half().requires_grad_(True) for _ in range(2)]
    h_t = {1: torch.randn(3, 4, 8) * 1e5}
    logits = torch.randn(3, 5).half().requires_grad_(True)
    mask = torch.ones(3, 4, dtype=torch.long)
    out = SAGELoss(cfg)({"logits": logits, "hidden_states": h_s}, {"logits": torch.randn(3, 5), "hidden_states": h_t},
                        attention_mask=mask)
    d = h_s[1].detach().double() - h_t[1].double()
    s64, t64 = h_s[1].detach().double(), h_t[1].double()
    cos = (s64 * t64).sum(-1) / (s64.norm(dim=-1) * t64.norm(dim=-1))
    expected = ((d ** 2).mean(-1) + 0.5 * (1 - cos)).mean(1)
    assert torch.isfinite(out.align_per_example).all()
    torch.testing.assert_close(out.align_per_example.double(), expected, rtol=1e-5, atol=0)
    out.loss.backward()
    assert h_s[1].grad.dtype == torch.float16 and torch.isfinite(h_s[1].grad).all()


def test_non_finite_teacher_is_still_named():
    cfg = SAGELossConfig()
    teacher_logits = torch.randn(4, 3)
    teacher_logits[2, 1] = float("inf")
    with pytest.raises(ValueError, match="teacher_logits has 1 non-finite"):
        SAGELoss(cfg)({"logits": torch.randn(4, 3).half()}, {"logits": teacher_logits})


# ----------------------------------------------------------------------------- causal language models
VOCAB, B, T = 50, 4, 9


def tiny_gpt2(layers, seed):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=layers, n_head=2)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def lm_models():
    return tiny_gpt2(2, seed=0), tiny_gpt2(1, seed=1)


def lm_batch():
    ids = torch.randint(0, VOCAB, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0  # padding at the end
    mask[2, 3:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[0, :4] = -100  # a prompt whose tokens have no gold label
    labels[3] = -100  # a synthetic sequence: the teacher's soft labels only
    return ids, mask, labels


def run_lm(lm_models, ids, mask):
    teacher, student = lm_models
    with torch.no_grad():
        teacher_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return student(input_ids=ids, attention_mask=mask, output_hidden_states=True), teacher_out


def expected_lm_float64(student_logits, teacher_logits, labels, mask, alpha, temperature, shift=True):
    """Per-sequence losses written out by hand: shift, per-token KL + CE, mean over counted tokens."""
    s, t, y, counted = student_logits.double(), teacher_logits.double(), labels, mask.bool()
    if shift:
        s, t, y, counted = s[:, :-1], t[:, :-1], y[:, 1:], counted[:, 1:]
    log_ps, log_pt = torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1)
    kd = alpha * temperature**2 * (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    ce = -torch.log_softmax(s, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    token = kd + (1 - alpha) * torch.where(y != -100, ce, 0.0)
    return (token * counted).sum(1) / counted.sum(1).clamp(min=1)


def test_causal_lm_outputs_match_hand_written_float64(lm_models, seed):
    ids, mask, labels = lm_batch()
    student_out, teacher_out = run_lm(lm_models, ids, mask)
    loss_module = SAGELoss(SAGELossConfig(alpha=0.4, temperature=2.0))
    out = loss_module(student_out, teacher_out, labels=labels, attention_mask=mask)
    expected = expected_lm_float64(student_out.logits, teacher_out.logits, labels, mask, 0.4, 2.0)
    assert out.per_example.shape == (B,) and out.per_example.dtype == torch.float32
    torch.testing.assert_close(out.per_example.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), expected.mean(), rtol=1e-5, atol=1e-6)
    params = [p for p in lm_models[1].parameters() if p.requires_grad][:4] + [lm_models[1].lm_head.weight]
    grads = torch.autograd.grad(out.loss, params, retain_graph=True)
    ref_grads = torch.autograd.grad(expected.mean(), params)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref.to(grad.dtype), rtol=1e-4, atol=1e-6)


def test_causal_lm_padding_counts_in_nothing_and_synthetic_sequences_keep_the_kl(lm_models):
    torch.manual_seed(0)
    ids, mask, labels = lm_batch()
    student_out, teacher_out = run_lm(lm_models, ids, mask)
    loss_module = SAGELoss(SAGELossConfig(alpha=0.4, temperature=2.0))
    out = loss_module(student_out, teacher_out, labels=labels, attention_mask=mask)
    # other logits at the padded positions (and at the last position, which predicts nothing)
    student_logits = student_out.logits.detach().clone()
    student_logits[1, 5:] += 7.0 * torch.randn(T - 5, VOCAB)
    student_logits[:, -1] += 3.0
    moved = loss_module({"logits": student_logits}, teacher_out, labels=labels, attention_mask=mask)
    torch.testing.assert_close(moved.per_example[[0, 2, 3]], out.per_example[[0, 2, 3]], rtol=0, atol=0)
    torch.testing.assert_close(moved.per_example[1], out.per_example[1], rtol=0, atol=0)
    # the synthetic sequence is alpha times its pure-KL loss: no cross-entropy, but every token's KL
    kl_only = loss_module.__class__(SAGELossConfig(alpha=1.0, temperature=2.0))(student_out, teacher_out,
                                                                               attention_mask=mask)
    torch.testing.assert_close(out.per_example[3], 0.4 * kl_only.per_example[3])
    assert bool(out.per_example[3] > 0)


def test_causal_lm_alignment_term_per_sequence(lm_models):
    torch.manual_seed(0)
    ids, mask, labels = lm_batch()
    student_out, teacher_out = run_lm(lm_models, ids, mask)
    config = SAGELossConfig(alpha=0.5, temperature=2.0, beta=0.3, layer_map={1: 2})
    out = SAGELoss(config)(student_out, teacher_out, labels=labels, attention_mask=mask)
    assert out.align_per_example.shape == (B,) and out.kd_per_example.shape == (B,)
    torch.testing.assert_close(out.loss, (out.kd_per_example + 0.3 * out.align_per_example).mean())


def test_token_classification_without_shift(lm_models):
    torch.manual_seed(0)
    ids, mask, labels = lm_batch()
    student_out, teacher_out = run_lm(lm_models, ids, mask)
    out = SAGELoss(SAGELossConfig(alpha=0.4, temperature=2.0, shift_labels=False))(
        student_out, teacher_out, labels=labels, attention_mask=mask)
    expected = expected_lm_float64(student_out.logits, teacher_out.logits, labels, mask, 0.4, 2.0, shift=False)
    torch.testing.assert_close(out.per_example.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("labels", torch.zeros(B, T - 1, dtype=torch.long), "labels must have shape"),
    ("attention_mask", torch.ones(B, T + 1, dtype=torch.long), "attention_mask must have shape"),
])
def test_causal_lm_bad_shapes_name_the_argument(lm_models, field, value, message):
    torch.manual_seed(0)
    ids, mask, labels = lm_batch()
    student_out, teacher_out = run_lm(lm_models, ids, mask)
    kw = {"labels": labels, "attention_mask": mask, field: value}
    with pytest.raises(ValueError, match=message):
        SAGELoss(SAGELossConfig())(student_out, teacher_out, **kw)
