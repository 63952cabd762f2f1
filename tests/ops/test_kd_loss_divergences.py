"""kd_loss for token-level distillation: reverse KL and the generalized JSD beside forward KL, logits
of any leading shape, ignored and soft-label rows, T^2 scaling, num_items_in_batch, and agreement with
TRL's and Liger's losses. Every case runs the Triton kernel (the interpreter on CPU) and the torch path
against the float64 composition in ``kd_loss_reference``, whose own numbers are checked against TRL's
and Liger's."""
import importlib

import pytest
import torch

from sage_fast import use_backend
from sage_fast.ops.kd_loss import kd_loss, kd_loss_reference

from kd_loss_support import (assert_no_host_sync, assert_refused_before_launch, poison_outputs,  # noqa: E402
                             reference, run)

kd_module = importlib.import_module("sage_fast.ops.kd_loss")

BACKENDS = ("triton", "torch")
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.9)]
DIVERGENCE_IDS = ["forward", "reverse", "jsd0.3", "jsd0.9"]

pytestmark = pytest.mark.usefixtures("cuda_by_default")


def make_inputs(shape, *, dtype=torch.float64, scale=3.0, ignored=(), soft=(), labels=True):
    """Logits of ``shape`` ([..., V]) and labels of its leading shape; the flat rows in ``ignored``
    get -100, those in ``soft`` get -1."""
    student = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)
    if not labels:
        return student, teacher, None
    y = torch.randint(0, shape[-1], shape[:-1])
    flat = y.view(-1)
    flat[list(ignored)] = -100
    flat[list(soft)] = -1
    return student, teacher, y


def assert_matches_reference(backend, student, teacher, labels, kw, *, loss_tol=(1e-10, 1e-12),
                             grad_tol=(1e-10, 1e-12)):
    loss, grad = run(backend, student, teacher, labels, **kw)
    ref_loss, ref_grad = reference(student, teacher, labels, **kw)
    assert loss.shape == student.shape[:-1] and grad.shape == student.shape
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=loss_tol[0], atol=loss_tol[1])
    torch.testing.assert_close(grad.double(), ref_grad, rtol=grad_tol[0], atol=grad_tol[1])


# ------------------------------------------------------------------ each divergence against float64
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence, beta", DIVERGENCES, ids=DIVERGENCE_IDS)
@pytest.mark.parametrize("shape", [(1, 5), (9, 2), (2, 3, 37), (3, 700)], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_divergences_match_float64_reference(backend, divergence, beta, shape, temperature, seed):
    n_rows = 1 if len(shape) == 2 and shape[0] == 1 else 3
    student, teacher, labels = make_inputs(shape, ignored=(0,) if n_rows > 1 else (), soft=(2,) if n_rows > 1 else ())
    kw = dict(temperature=temperature, alpha=0.6, divergence=divergence, beta=beta, soft_label_index=-1)
    assert_matches_reference(backend, student, teacher, labels, kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence, beta", DIVERGENCES, ids=DIVERGENCE_IDS)
@pytest.mark.parametrize("alpha", [1.0, 0.0])  # the divergence alone (labels still mask), CE alone
def test_each_term_alone(backend, divergence, beta, alpha):
    torch.manual_seed(int(10 * beta) + int(alpha))
    student, teacher, labels = make_inputs((2, 4, 11), ignored=(1, 6), soft=(3,))
    kw = dict(temperature=1.5, alpha=alpha, divergence=divergence, beta=beta, soft_label_index=-1)
    loss, _ = run(backend, student, teacher, labels, **kw)
    assert loss.view(-1)[[1, 6]].eq(0).all()
    if alpha == 0.0:
        assert loss.view(-1)[3] == 0  # a soft-label row has no cross-entropy, and the divergence is off
    assert_matches_reference(backend, student, teacher, labels, kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence, beta", DIVERGENCES, ids=DIVERGENCE_IDS)
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_streamed_rows_with_growing_maxima(backend, divergence, beta, temperature, monkeypatch, seed):
    # 16-wide tiles over 53 classes, logits that grow along the row: the running maxima move tile after
    # tile, so the reverse KL's running sum is rescaled, and JSD takes its extra pass
    monkeypatch.setattr(kd_module, "MAX_BLOCK_C", 16)
    student, teacher, labels = make_inputs((5, 53), ignored=(1,), soft=(3,))
    ramp = torch.linspace(0, 40, 53, dtype=torch.float64)
    student, teacher = student + ramp, teacher + ramp.flip(0)
    kw = dict(temperature=temperature, alpha=0.3, divergence=divergence, beta=beta, soft_label_index=-1)
    assert_matches_reference(backend, student, teacher, labels, kw, grad_tol=(1e-9, 1e-12))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence, beta", DIVERGENCES[1:], ids=DIVERGENCE_IDS[1:])
@pytest.mark.parametrize("shape", [(16, 2), (7, 300), (3, 5000)], ids=str)  # flat runs, one tile, streamed
@pytest.mark.parametrize("offsets", [(1e4, 1e4), (1e4, -1e4)], ids=str)
def test_large_logits_keep_float32_precision(backend, divergence, beta, shape, offsets):
    # float32 logits around +-1e4: from max-shifted logits the loss keeps float32 precision; float64 of
    # the same rounded inputs is the truth. A class where p and q both underflow has a finite log m.
    torch.manual_seed(shape[1])
    student, teacher, labels = make_inputs(shape, dtype=torch.float32, ignored=(0,))
    student, teacher = student + offsets[0], teacher + offsets[1]
    student[1, 0] += 200.0  # p and q both far below float32's smallest number elsewhere in that row
    kw = dict(temperature=2.0, alpha=0.5, divergence=divergence, beta=beta)
    assert_matches_reference(backend, student, teacher, labels, kw, loss_tol=(1e-5, 1e-5), grad_tol=(1e-4, 1e-6))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence, beta", DIVERGENCES[1:], ids=DIVERGENCE_IDS[1:])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(backend, divergence, beta, dtype):
    torch.manual_seed(0)
    student, teacher, labels = make_inputs((13, 200), dtype=dtype, ignored=(3,))
    kw = dict(temperature=2.0, alpha=0.3, divergence=divergence, beta=beta)
    loss, grad = run(backend, student, teacher, labels, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_matches_reference(backend, student, teacher, labels, kw, loss_tol=(1e-4, 1e-4), grad_tol=(2e-2, 2e-3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence, beta", DIVERGENCES, ids=DIVERGENCE_IDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(backend, divergence, beta, reduction):
    # the gradient written in the forward pass against finite differences of the op's own loss
    torch.manual_seed(0)
    student, teacher, labels = make_inputs((2, 2, 5), scale=1.0, ignored=(1,), soft=(2,))
    student.requires_grad_(True)

    def loss(s):
        with use_backend(backend):
            return kd_loss(s, teacher, labels, temperature=1.7, alpha=0.4, divergence=divergence, beta=beta,
                           soft_label_index=-1, reduction=reduction)

    assert torch.autograd.gradcheck(loss, (student,))


def test_reference_divergences_by_definition():
    # the reference itself, against the divergences written with probabilities
    torch.manual_seed(0)
    s, t = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    p, q = torch.softmax(t / 2, 1), torch.softmax(s / 2, 1)
    m = 0.3 * p + 0.7 * q
    expected = {
        ("forward_kl", 0.5): (p * (p / q).log()).sum(1),
        ("reverse_kl", 0.5): (q * (q / p).log()).sum(1),
        ("jsd", 0.3): 0.3 * (p * (p / m).log()).sum(1) + 0.7 * (q * (q / m).log()).sum(1),
        ("jsd", 0.0): (p * (p / q).log()).sum(1),  # TRL's convention at the ends
        ("jsd", 1.0): (q * (q / p).log()).sum(1),
    }
    for (divergence, beta), value in expected.items():
        got = kd_loss_reference(s, t, temperature=2.0, divergence=divergence, beta=beta, reduction="none")
        torch.testing.assert_close(got, 4.0 * value, rtol=1e-12, atol=1e-14)
        unscaled = kd_loss_reference(s, t, temperature=2.0, divergence=divergence, beta=beta, scale_by_t2=False,
                                     reduction="none")
        torch.testing.assert_close(unscaled, value, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ shapes, rows that count, reductions
@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_shape_in_and_out(backend, seed):
    student, teacher, labels = make_inputs((2, 3, 7), ignored=(4,), soft=(1,))
    kw = dict(temperature=2.0, alpha=0.5, soft_label_index=-1)
    s = student.clone().requires_grad_(True)
    with use_backend(backend):
        per_row, per_example = kd_loss(s, teacher, labels, reduction="none", return_per_example=True, **kw)
        mean = kd_loss(student, teacher, labels, **kw)
    assert per_row.shape == (2, 3) and per_example.shape == (2, 3) and per_example.dtype == torch.float32
    flat = kd_loss(student.view(6, 7), teacher.view(6, 7), labels.view(6), reduction="none", **kw)
    torch.testing.assert_close(per_row.view(6), flat, rtol=1e-12, atol=0)
    assert per_row[1, 1] == 0  # flat row 4 is ignored
    torch.testing.assert_close(mean, per_row.sum() / 5, rtol=1e-12, atol=0)  # 6 rows, 1 ignored


@pytest.mark.parametrize("backend", BACKENDS)
def test_merging_leading_dimensions_copies_nothing(backend, monkeypatch):
    # [B, T, V] rows with one row stride reach the implementation as a view; a slice whose rows have two
    # strides (the causal shift logits[:, :-1]) is copied once and still right
    seen = []
    for name in ("_forward_triton", "_forward_torch"):
        forward = getattr(kd_module, name)

        def spy(student, teacher, *args, _forward=forward):
            seen.append((student.data_ptr(), teacher.data_ptr()))
            return _forward(student, teacher, *args)

        monkeypatch.setattr(kd_module, name, spy)
    student, teacher, labels = make_inputs((2, 4, 9))
    with use_backend(backend):
        kd_loss(student, teacher, labels, alpha=0.5)
    assert seen[-1] == (student.data_ptr(), teacher.data_ptr())
    shifted = student[:, :-1], teacher[:, :-1], labels[:, 1:]
    assert_matches_reference(backend, *shifted, dict(alpha=0.5, temperature=2.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum"])
def test_num_items_in_batch_and_batchmean(backend, reduction, seed):
    student, teacher, labels = make_inputs((2, 5, 6), ignored=(0, 7))
    kw = dict(temperature=2.0, alpha=0.5, divergence="jsd", scale_by_t2=False)
    ref_rows = kd_loss_reference(student, teacher, labels, reduction="none", **kw)
    for num_items, denominator in [(None, {"sum": 1, "mean": 8, "batchmean": 8}[reduction]), (17, 17),
                                   (torch.tensor(17), 17), (torch.tensor(17.0, dtype=torch.float64), 17)]:
        s = student.clone().requires_grad_(True)
        r = student.clone().requires_grad_(True)
        with use_backend(backend):
            loss = kd_loss(s, teacher, labels, reduction=reduction, num_items_in_batch=num_items, **kw)
        ref = kd_loss_reference(r, teacher, labels, reduction=reduction, num_items_in_batch=num_items, **kw)
        torch.testing.assert_close(loss, ref_rows.sum() / denominator, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ref, ref_rows.sum() / denominator, rtol=1e-12, atol=1e-14)
        (3.0 * loss).backward()
        (3.0 * ref).backward()
        torch.testing.assert_close(s.grad, r.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_by_t2(backend, seed):
    student, teacher, labels = make_inputs((5, 9), ignored=(2,))
    kw = dict(temperature=3.0, alpha=1.0, divergence="reverse_kl")
    scaled, scaled_grad = run(backend, student, teacher, labels, **kw)
    plain, plain_grad = run(backend, student, teacher, labels, scale_by_t2=False, **kw)
    torch.testing.assert_close(scaled, 9.0 * plain, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(scaled_grad, 9.0 * plain_grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence, beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_poisoned_outputs_are_all_written(backend, divergence, beta, monkeypatch):
    # outputs filled with NaN before the op writes them; several programs, the last one partial
    poison_outputs(monkeypatch)
    monkeypatch.setattr(kd_module, "_TILE_ELEMS_INTERPRETER", 64)
    torch.manual_seed(0)
    for shape in [(11, 3), (5, 40)]:
        student, teacher, labels = make_inputs(shape, dtype=torch.float32, ignored=(1,), soft=(2,))
        kw = dict(temperature=2.0, alpha=0.3, divergence=divergence, beta=beta, soft_label_index=-1)
        assert_matches_reference(backend, student, teacher, labels, kw, loss_tol=(1e-5, 1e-5),
                                 grad_tol=(1e-4, 1e-6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_ignored_rows(backend, seed):
    # ignore_index=None: every row counts; a row labelled -100 is then out of range
    student, teacher, labels = make_inputs((6, 5), soft=(2,))
    kw = dict(temperature=2.0, alpha=0.5, ignore_index=None, soft_label_index=-1)
    assert_matches_reference(backend, student, teacher, labels, kw)
    with use_backend(backend):
        mean = kd_loss(student, teacher, labels, **kw)
    torch.testing.assert_close(mean, kd_loss_reference(student, teacher, labels, reduction="none", **kw).mean())
    labels[0] = -100
    with pytest.raises(ValueError, match="labels"):
        kd_loss(student, teacher, labels, **kw)


# ------------------------------------------------------------------ second derivatives
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_says_what_to_use_instead(backend):
    student, teacher, labels = make_inputs((3, 4))
    s = student.clone().requires_grad_(True)
    with use_backend(backend):
        loss = kd_loss(s, teacher, labels, alpha=0.5)
    (g,) = torch.autograd.grad(loss, s, create_graph=True)  # the first derivative is still given
    penalty = g.pow(2).sum()
    with pytest.raises(RuntimeError, match="no double backward.*kd_loss_reference"):
        penalty.backward()
    # the reference does have one
    r = student.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(kd_loss_reference(r, teacher, labels, alpha=0.5), r, create_graph=True)
    torch.testing.assert_close(g.detach(), g_ref.detach(), rtol=1e-10, atol=1e-12)
    g_ref.pow(2).sum().backward()
    assert r.grad is not None


# ------------------------------------------------------------------ bad input
def bad_calls():
    s, t, y = make_inputs((2, 3, 6), dtype=torch.float32)
    cases = [
        ("divergence", lambda: kd_loss(s, t, y, divergence="kl")),
        ("beta", lambda: kd_loss(s, t, y, divergence="jsd", beta=1.5)),
        ("beta", lambda: kd_loss(s, t, y, beta=-0.1)),
        ("scale_by_t2", lambda: kd_loss(s, t, y, scale_by_t2=1)),
        ("soft_label_index", lambda: kd_loss(s, t, y, soft_label_index=-100)),
        ("soft_label_index", lambda: kd_loss(s, t, y, soft_label_index=1.5)),
        ("ignore_index", lambda: kd_loss(s, t, y, ignore_index="pad")),
        ("num_items_in_batch", lambda: kd_loss(s, t, y, num_items_in_batch=0)),
        ("num_items_in_batch", lambda: kd_loss(s, t, y, num_items_in_batch=True)),
        ("num_items_in_batch", lambda: kd_loss(s, t, y, num_items_in_batch=2.5)),
        ("num_items_in_batch", lambda: kd_loss(s, t, y, num_items_in_batch=torch.tensor([4]))),
        ("num_items_in_batch", lambda: kd_loss(s, t, y, num_items_in_batch=torch.tensor(0))),
        ("num_items_in_batch", lambda: kd_loss(s, t, y, reduction="none", num_items_in_batch=4)),
        ("labels", lambda: kd_loss(s, t, y.view(6))),
        ("labels", lambda: kd_loss(s, t, y[:, :2])),
        ("labels", lambda: kd_loss(s, t, torch.full((2, 3), 6))),
        ("student_logits", lambda: kd_loss(s[0, 0], t[0, 0], None)),
        ("student_logits", lambda: kd_loss(s[:, :0], t[:, :0], y[:, :0])),
        ("teacher_logits", lambda: kd_loss(s, t.view(6, 6), y)),
    ]
    return cases


@pytest.mark.parametrize("index", range(len(bad_calls())))
def test_bad_input_raises_naming_the_argument(index, monkeypatch):
    assert_refused_before_launch(monkeypatch, *bad_calls()[index])


# ------------------------------------------------------------------ no host waits
@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation exists only with a GPU")
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("vocab", [2, 1000, 32000])
def test_no_host_synchronisation_on_cuda(divergence, vocab, monkeypatch):
    # the mean over the rows that count is counted on the device, and num_items_in_batch is used where
    # it lies (read for free when on the CPU)
    monkeypatch.setattr(kd_module._checks, "_VALUE_CHECKS", False)  # whatever SAGE_FAST_CHECK_VALUES says
    student, teacher, labels = make_inputs((4, 64, vocab), dtype=torch.bfloat16, ignored=range(0, 256, 3))
    student.requires_grad_(True)
    kw = dict(temperature=2.0, alpha=0.5, divergence=divergence, beta=0.3)

    def step():
        kd_loss(student, teacher, labels, **kw).backward()
        kd_loss(student, teacher, labels, num_items_in_batch=labels.ne(-100).sum(), **kw).backward()
        kd_loss(student, teacher, labels, num_items_in_batch=torch.tensor(100, device="cpu"), **kw).backward()

    assert_no_host_sync(step)
