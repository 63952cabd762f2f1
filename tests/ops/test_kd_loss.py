import importlib
import re

import pytest
import torch

from sage_fast import use_backend
from sage_fast.ops.kd_loss import kd_loss, kd_loss_reference

from kd_loss_support import (assert_no_host_sync, assert_refused_before_launch, poison_outputs,  # noqa: E402
                             reference, run)

# the module, not the function that sage_fast.ops re-exports under the same name
kd_module = importlib.import_module("sage_fast.ops.kd_loss")
_next_pow2 = kd_module._next_pow2

BACKENDS = ("triton", "torch")

# on a GPU machine the tensors below are CUDA tensors, so "triton" runs the compiled kernel
pytestmark = pytest.mark.usefixtures("cuda_by_default")


def make_inputs(n, c, *, dtype=torch.float32, scale=3.0, ignored=(), labels=True):
    student = (torch.randn(n, c, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(n, c, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, c, (n,)) if labels else None
    if labels:
        for row in ignored:
            y[row] = -100
    return student, teacher, y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 5), (7, 2), (33, 3), (33, 1000), (3, 5000)], ids=str)
def test_matches_float64_reference(backend, shape, seed):
    student, teacher, labels = make_inputs(*shape, ignored=(0,) if shape[0] > 1 else ())
    kw = dict(temperature=2.0, alpha=0.3)
    loss, grad = run(backend, student, teacher, labels, **kw)
    ref_loss, ref_grad = reference(student, teacher, labels, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
def test_alpha_and_temperature(backend, alpha, temperature):
    torch.manual_seed(int(10 * alpha + temperature))
    student, teacher, labels = make_inputs(9, 37, dtype=torch.float64, ignored=(4,))
    kw = dict(temperature=temperature, alpha=alpha)
    loss, grad = run(backend, student, teacher, labels, **kw)
    ref_loss, ref_grad = reference(student, teacher, labels, **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_wider_than_one_tile(backend, monkeypatch, seed):
    # small tiles, and logits that grow along the row so the running maxima change tile after tile
    monkeypatch.setattr(kd_module, "MAX_BLOCK_C", 16)
    student, teacher, labels = make_inputs(5, 53, dtype=torch.float64, ignored=(1,))
    ramp = torch.linspace(0, 40, 53, dtype=torch.float64)
    student, teacher = student + ramp, teacher + ramp.flip(0)
    kw = dict(temperature=0.5, alpha=0.3)
    loss, grad = run(backend, student, teacher, labels, **kw)
    ref_loss, ref_grad = reference(student, teacher, labels, **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_per_example(backend, reduction, seed):
    student, teacher, labels = make_inputs(11, 6, dtype=torch.float64, ignored=(2, 5))
    kw = dict(temperature=1.5, alpha=0.5, reduction=reduction)
    s = student.clone().requires_grad_(True)
    r = student.clone().requires_grad_(True)
    with use_backend(backend):
        loss, per_example = kd_loss(s, teacher, labels, return_per_example=True, **kw)
    ref_loss, ref_per_example = kd_loss_reference(r, teacher, labels, return_per_example=True, **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert per_example.dtype == torch.float32 and per_example.shape == (11,)
    assert not per_example.requires_grad
    torch.testing.assert_close(per_example, ref_per_example)
    assert torch.equal(per_example[[2, 5]], torch.zeros(2))  # ignored rows count in no term
    if reduction == "mean":  # and not in the denominator
        torch.testing.assert_close(loss, ref_per_example.double().sum() / 9, rtol=1e-6, atol=0)
    weights = torch.randn(11, dtype=torch.float64) if reduction == "none" else None
    (g,) = torch.autograd.grad(loss, s, weights)
    (ref_g,) = torch.autograd.grad(ref_loss, r, weights)
    torch.testing.assert_close(g, ref_g, rtol=1e-10, atol=1e-12)


def assert_finite_and_close(backend, student, teacher, labels, kw, *, loss_tol, grad_tol):
    """Loss and gradient are finite everywhere and match the float64 reference within (rtol, atol)."""
    loss, grad = run(backend, student, teacher, labels, **kw)
    ref_loss, ref_grad = reference(student, teacher, labels, **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=loss_tol[0], atol=loss_tol[1])
    torch.testing.assert_close(grad.double(), ref_grad, rtol=grad_tol[0], atol=grad_tol[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 20.0])
def test_huge_logits_stay_finite(backend, temperature, seed):
    student, teacher, labels = make_inputs(6, 300, scale=1e4)
    student[0, 7] = 1e4  # a dominant logit: softmax is one-hot at T=0.5
    teacher[1, :] = -1e4
    assert_finite_and_close(backend, student, teacher, labels, dict(temperature=temperature, alpha=0.3),
                            loss_tol=(1e-4, 1e-2), grad_tol=(1e-4, 1e-5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [3, 40])  # the label found in the tile, and gathered
def test_all_ignored_soft_labels_and_no_labels(backend, c, seed):
    # an all-ignored batch: every term 0, gradient 0, and a mean of 0 rather than 0/0; rows labelled
    # soft_label_index are what no labels at all give (the divergence alone), and count in the mean
    student, teacher, labels = make_inputs(8, c, dtype=torch.float64)
    labels[:] = -1
    kw = dict(temperature=2.0, alpha=0.25)
    all_ignored, grad_ignored = run(backend, student, teacher, labels, ignore_index=-1, **kw)
    assert torch.equal(all_ignored, torch.zeros(8, dtype=torch.float64))
    assert torch.equal(grad_ignored, torch.zeros_like(student))
    s = student.clone().requires_grad_(True)
    with use_backend(backend):
        mean = kd_loss(s, teacher, labels, ignore_index=-1, **kw)
    mean.backward()
    assert mean.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(student))
    soft, grad_soft = run(backend, student, teacher, labels, soft_label_index=-1, **kw)
    no_labels, grad_none = run(backend, student, teacher, None, **kw)
    ref_loss, ref_grad = reference(student, teacher, None, **kw)
    for loss, grad in [(soft, grad_soft), (no_labels, grad_none)]:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    with use_backend(backend):
        soft_mean = kd_loss(student, teacher, labels, soft_label_index=-1, **kw)
    torch.testing.assert_close(soft_mean, ref_loss.mean(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(backend, dtype, seed):
    student, teacher, labels = make_inputs(13, 200, dtype=dtype, ignored=(3,))
    kw = dict(temperature=2.0, alpha=0.3)
    loss, grad = run(backend, student, teacher, labels, **kw)
    ref_loss, ref_grad = reference(student, teacher, labels, **kw)  # float64 of the rounded inputs
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "column_slice", "row_stride"])
@pytest.mark.parametrize("c", [21, 2])  # 2: rows that are read as one flat run when contiguous
def test_non_contiguous_inputs(backend, layout, c, seed):
    n = 9
    if layout == "transposed":
        student = torch.randn(c, n, dtype=torch.float64).t()
        teacher = torch.randn(c, n, dtype=torch.float64).t()
    elif layout == "column_slice":
        student = torch.randn(n, c + 5, dtype=torch.float64)[:, 2:c + 2]
        teacher = torch.randn(n, c + 3, dtype=torch.float64)[:, :c]
    else:
        student = torch.randn(2 * n, c, dtype=torch.float64)[::2]
        teacher = torch.randn(3 * n, c, dtype=torch.float64)[::3]
    labels = torch.randint(0, c, (2 * n,))[::2]
    before = (student.clone(), teacher.clone(), labels.clone())
    kw = dict(temperature=3.0, alpha=0.6)
    loss, grad = run(backend, student, teacher, labels, **kw)
    ref_loss, ref_grad = reference(student, teacher, labels, **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    for original, after in zip(before, (student, teacher, labels)):
        assert torch.equal(original, after)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(backend, reduction):
    torch.manual_seed(0)
    student, teacher, labels = make_inputs(3, 4, dtype=torch.float64, scale=1.0, ignored=(1,))
    student.requires_grad_(True)

    def loss(s):
        with use_backend(backend):
            return kd_loss(s, teacher, labels, temperature=1.7, alpha=0.4, reduction=reduction)

    assert torch.autograd.gradcheck(loss, (student,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_poisoned_outputs_are_all_written(backend, monkeypatch, seed):
    poison_outputs(monkeypatch)
    for shape in [(1, 3), (33, 2), (5, 4100)]:
        student, teacher, labels = make_inputs(*shape, ignored=(0,))
        assert_finite_and_close(backend, student, teacher, labels, dict(alpha=0.3),
                                loss_tol=(1e-5, 1e-5), grad_tol=(1e-4, 1e-6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_and_detached_teacher(backend, seed):
    student, teacher, labels = make_inputs(5, 7, dtype=torch.float64)
    ref = kd_loss_reference(student, teacher, labels, alpha=0.5)
    with use_backend(backend), torch.no_grad():
        assert torch.allclose(kd_loss(student.requires_grad_(True), teacher, labels, alpha=0.5), ref)
    student.requires_grad_(False)
    teacher.requires_grad_(True)
    with use_backend(backend):
        loss = kd_loss(student, teacher, labels, alpha=0.5)
    assert not loss.requires_grad  # the teacher is a target, never differentiated
    torch.testing.assert_close(loss, ref)


def test_backends_agree_on_one_class():
    student, teacher, labels = make_inputs(4, 1, dtype=torch.float64)
    for backend in BACKENDS:
        with use_backend(backend):
            loss = kd_loss(student, teacher, labels, alpha=0.5)
            torch.testing.assert_close(loss, torch.zeros((), dtype=torch.float64), atol=1e-12, rtol=0)


def bad_calls():
    s, t, y = make_inputs(4, 6)
    cases = [
        ("student_logits", lambda: kd_loss(s[0], t, y)),
        ("student_logits", lambda: kd_loss(s.long(), t, y)),
        ("teacher_logits", lambda: kd_loss(s, t[:3], y)),
        ("teacher_logits", lambda: kd_loss(s, t.to(torch.int32), y)),
        ("teacher_logits", lambda: kd_loss(s, [[1.0]], y)),
        ("student_logits", lambda: kd_loss(s[:0], t[:0], y[:0])),
        ("student_logits", lambda: kd_loss(s[:, :0], t[:, :0], y)),
        ("temperature", lambda: kd_loss(s, t, y, temperature=0.0)),
        ("temperature", lambda: kd_loss(s, t, y, temperature=-1.0)),
        ("temperature", lambda: kd_loss(s, t, y, temperature=float("nan"))),
        ("alpha", lambda: kd_loss(s, t, y, alpha=1.5)),
        ("alpha", lambda: kd_loss(s, t, y, alpha=-0.1)),
        ("labels", lambda: kd_loss(s, t, y[:3])),
        ("labels", lambda: kd_loss(s, t, y.float())),
        ("labels", lambda: kd_loss(s, t, y.bool())),
        ("labels", lambda: kd_loss(s, t, torch.tensor([0, 1, 6, 2]))),
        ("labels", lambda: kd_loss(s, t, torch.tensor([0, 1, -1, 2]))),
        ("teacher_logits", lambda: kd_loss(s, t.clone().index_fill_(1, torch.tensor([2]), float("nan")), y)),
        ("teacher_logits", lambda: kd_loss(s, t.clone().index_fill_(1, torch.tensor([3]), float("inf")), y)),
        ("reduction", lambda: kd_loss(s, t, y, reduction="batch_mean")),
        ("ignore_index", lambda: kd_loss(s, t, y, ignore_index=1.5)),
    ]
    if torch.cuda.is_available():
        cases.append(("teacher_logits", lambda: kd_loss(s.cuda(), t.cpu(), y.cpu())))
        cases.append(("labels", lambda: kd_loss(s.cpu(), t.cpu(), y.cuda())))
    return cases


@pytest.mark.parametrize("index", range(len(bad_calls())))
def test_bad_input_raises_naming_the_argument(index, monkeypatch):
    assert_refused_before_launch(monkeypatch, *bad_calls()[index])


@pytest.mark.parametrize("n_classes", [3, 40], ids=["transposed", "rows"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_torch_path_in_several_chunks(n_classes, dtype, temperature, monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(kd_module, "_TORCH_CHUNK_ELEMS", 4 * n_classes)
    monkeypatch.setattr(kd_module, "_TORCH_MIN_CHUNK_ELEMS", 1)
    student, teacher, labels = make_inputs(11, n_classes, dtype=dtype, ignored=(5,))
    kw = dict(temperature=temperature, alpha=0.4)
    loss, grad = run("torch", student, teacher, labels, **kw)
    ref_loss, ref_grad = reference(student, teacher, labels, **kw)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss.double(), ref_loss, **tol)
    tol = tol if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(grad.double(), ref_grad, **tol)


# ------------------------------------------------------------------ precision with large logits
# Shapes that take each path of the kernel: narrow rows read as one flat run with the label found in
# the tile (2 classes), one tile per row with the label gathered (1000), and rows streamed tile by
# tile (5000 > the interpreter's 4096-wide tile; on a GPU the tuned tile decides).
PRECISION_SHAPES = [(64, 2), (7, 2), (9, 1000), (3, 5000)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", PRECISION_SHAPES, ids=str)
@pytest.mark.parametrize("offsets", [(1e3, 1e3), (1e4, 1e4), (1e4, -1e4), (-3e3, 2e3)], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0])
def test_large_logits_keep_float32_precision(backend, shape, offsets, temperature, seed):
    # float32 logits around +-1e4 (each input shifted by its own offset): the loss is a difference of
    # quantities near 1e4 unless it is computed from max-shifted logits; float64 of the same rounded
    # inputs is the truth. An unshifted computation is off by ~1e-3 here.
    student, teacher, labels = make_inputs(*shape, ignored=(0,))
    student, teacher = student + offsets[0], teacher + offsets[1]
    kw = dict(temperature=temperature, alpha=0.5)
    loss, grad = run(backend, student, teacher, labels, **kw)
    ref_loss, ref_grad = reference(student, teacher, labels, **kw)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [0.0, 1.0])  # cross-entropy alone, KL alone
def test_large_logits_each_term(backend, alpha, seed):
    student, teacher, labels = make_inputs(9, 1000)
    student, teacher = student + 1e4, teacher - 5e3
    loss, grad = run(backend, student, teacher, labels, temperature=2.0, alpha=alpha)
    ref_loss, ref_grad = reference(student, teacher, labels, temperature=2.0, alpha=alpha)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(33, 2), (9, 1000)], ids=str)
def test_float16_range(backend, shape, seed):
    # float16 logits across its whole range (up to 6e4); computed in float32, nothing overflows
    student, teacher, labels = make_inputs(*shape, scale=2e4, ignored=(1,))
    student, teacher = (x.clamp(-65504.0, 65504.0).half() for x in (student, teacher))
    student[0, 0], teacher[0, 1] = 65504.0, -65504.0
    kw = dict(temperature=2.0, alpha=0.5)
    loss, grad = run(backend, student, teacher, labels, **kw)
    ref_loss, ref_grad = reference(student, teacher, labels, **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-2, atol=2e-3)


# ------------------------------------------------------------------ mixed dtypes
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.float32, torch.float64), (torch.float16, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("c", [2, 300])
def test_mixed_dtypes_read_each_input_in_its_own(backend, dtypes, c, seed):
    # a float32 teacher beyond float16's range with a float16 student: read as float32, no overflow
    student_dtype, teacher_dtype = dtypes
    student, _, labels = make_inputs(17, c, dtype=student_dtype, ignored=(2,))
    teacher = (torch.randn(17, c, dtype=torch.float64) * 3e4).to(teacher_dtype)
    kw = dict(temperature=3.0, alpha=0.4)
    loss, grad = run(backend, student, teacher, labels, **kw)
    ref_loss, ref_grad = reference(student, teacher, labels, **kw)
    acc = torch.float64 if torch.float64 in dtypes else torch.float32
    assert loss.dtype == acc and grad.dtype == student_dtype
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    tol = 1e-10 if acc == torch.float64 else 1e-5
    torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=tol * 10)
    grad_tol = dict(rtol=1e-5, atol=1e-7) if student_dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(grad.double(), ref_grad, **grad_tol)  # rounded to the student's dtype


# ------------------------------------------------------------------ no host waits
@pytest.mark.parametrize("shape", [(7, 2), (6, 40)], ids=str)
def test_unchecked_values_are_not_read_and_a_bad_label_makes_a_nan_row(shape, monkeypatch):
    # as on CUDA without SAGE_FAST_CHECK_VALUES: nothing reads the values on the host, so a non-finite
    # teacher is not refused, and a label out of range gives its row a NaN loss (never a read past
    # the row); the other rows are right
    monkeypatch.setattr(kd_module._checks, "values_checked", lambda tensor: False)

    def no_host_read(*args, **kwargs):
        raise AssertionError("read a value on the host")

    monkeypatch.setattr(kd_module._checks, "finite", no_host_read)
    monkeypatch.setattr(torch.Tensor, "tolist", no_host_read)
    torch.manual_seed(0)
    student, teacher, labels = make_inputs(*shape, dtype=torch.float64, ignored=(1,))
    labels[3], labels[4] = shape[1], -5
    loss, grad = run("triton", student, teacher, labels, temperature=2.0, alpha=0.5)
    bad = torch.zeros(shape[0], dtype=torch.bool)
    bad[[3, 4]] = True
    assert torch.isnan(loss[bad]).all()
    ref_loss, ref_grad = reference(student[~bad], teacher[~bad], labels[~bad], temperature=2.0, alpha=0.5)
    torch.testing.assert_close(loss[~bad], ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad[~bad], ref_grad, rtol=1e-10, atol=1e-12)
    teacher[0, 0] = float("nan")
    with use_backend("triton"):
        kd_loss(student, teacher, None)  # not refused: the check would need the host


def test_value_checks_opted_in(monkeypatch):
    # on CUDA the same checks run when asked; simulated here by the switch's answer
    monkeypatch.setattr(kd_module._checks, "values_checked", lambda tensor: True)
    student, teacher, labels = make_inputs(4, 6)
    labels[1] = 9
    with pytest.raises(ValueError, match="labels"):
        kd_loss(student, teacher, labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation exists only with a GPU")
@pytest.mark.parametrize("c", [2, 1000, 32000])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_host_synchronisation_on_cuda(c, reduction, monkeypatch):
    monkeypatch.setattr(kd_module._checks, "_VALUE_CHECKS", False)  # whatever SAGE_FAST_CHECK_VALUES says
    student, teacher, labels = make_inputs(256, c, dtype=torch.bfloat16)
    student.requires_grad_(True)

    def step():
        loss = kd_loss(student, teacher, labels, temperature=2.0, alpha=0.5, reduction=reduction)
        (loss if reduction == "mean" else loss.sum()).backward()
        (3.0 * kd_loss(student, teacher, labels, temperature=2.0, alpha=0.5)).backward()  # incoming gradient 3

    assert_no_host_sync(step)


# ------------------------------------------------------------------ backward
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_retained_graph_and_incoming_gradients(backend, reduction, seed):
    # backward scales the stored gradient in place unless the graph is kept: a retained graph must
    # give the same answer twice, and an earlier result must not change under a later backward
    student, teacher, labels = make_inputs(10, 7, dtype=torch.float64, ignored=(3,))
    kw = dict(temperature=2.0, alpha=0.3, reduction=reduction)
    s = student.clone().requires_grad_(True)
    r = student.clone().requires_grad_(True)
    with use_backend(backend):
        loss = kd_loss(s, teacher, labels, **kw)
    ref_loss = kd_loss_reference(r, teacher, labels, **kw)
    weights = [torch.ones_like(loss), torch.full_like(loss, 2.5), torch.randn_like(loss)]
    grads = [torch.autograd.grad(loss, s, w, retain_graph=True)[0] for w in weights]
    kept = [g.clone() for g in grads]
    last = torch.autograd.grad(loss, s, weights[1])[0]  # the graph's last use: scaled in place
    for g, k, w in zip(grads, kept, weights):
        (ref,) = torch.autograd.grad(ref_loss, r, w, retain_graph=True)
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)
        assert torch.equal(g, k)  # not overwritten by the later backward passes
    torch.testing.assert_close(last, grads[1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("factor", [1.0, 0.0, -3.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_backward_scaled(backend, factor, dtype, seed):
    # the usual loss.backward(), and a scaled loss (gradient scaling for mixed precision, weights)
    student, teacher, labels = make_inputs(33, 20, dtype=dtype, ignored=(5,))
    s = student.clone().requires_grad_(True)
    with use_backend(backend):
        (factor * kd_loss(s, teacher, labels, temperature=2.0, alpha=0.5)).backward()
    r = student.double().requires_grad_(True)
    (factor * kd_loss_reference(r, teacher.double(), labels, temperature=2.0, alpha=0.5)).backward()
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(s.grad.double(), r.grad, **tol)


def test_second_derivative_is_refused():
    student, teacher, labels = make_inputs(3, 4, dtype=torch.float64)
    s = student.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(kd_loss(s, teacher, labels, alpha=0.5), s, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        g.sum().backward()


# ------------------------------------------------------------------ compiled code (sm_90, no GPU needed)
# Every candidate tile the autotuner may pick, at the benchmarked widths and dtypes, with the
# benchmark's flags (KL and cross-entropy, gradient, T = 2): the tiles move 128-bit accesses (rows of
# 2 classes too, read as flat runs), the streamed loops hold nothing narrower, nothing spills, and the
# loops stay near the instruction count the math needs.
CODEGEN_CASES = [(c, dtype, config) for c in (2, 1000, 32000) for dtype in ("fp32", "bf16")
                 for config in kd_module._gpu_configs(c, 4 if dtype == "fp32" else 2, kd_module.MAX_BLOCK_C)]


def ptx_loop_bodies(ptx):
    """The instructions of each loop in ``ptx``: from a label to the branch that jumps back to it."""
    lines = [line.split("//")[0].strip() for line in ptx.splitlines()]
    labels = {line[:-1]: i for i, line in enumerate(lines) if re.fullmatch(r"\$?\w+:", line)}
    bodies = []
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$?\w+);", line)
        if m and labels.get(m.group(1), i) < i:
            bodies.append([x for x in lines[labels[m.group(1)]:i + 1] if x.endswith(";")])
    return bodies


@pytest.mark.parametrize("c, dtype, config", CODEGEN_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_compiled_kernel_is_vectorised_and_does_not_spill(c, dtype, config):
    tl = pytest.importorskip("triton.language")
    from sm90 import compile_sm90, parse_global_access_bits

    block_rows, block_c, warps = config
    n_rows, elem = 65536, 4 if dtype == "fp32" else 2
    vec = kd_module._vector_width(c, c, c, c)
    single, even_c = block_c >= c, c % block_c == 0
    k = compile_sm90(
        kd_module._kd_loss_kernel,
        dict(student_ptr=f"*{dtype}", teacher_ptr=f"*{dtype}", labels_ptr="*i64", loss_ptr="*fp32",
             grad_ptr=f"*{dtype}", scale_ptr="*fp32", n_rows=n_rows, n_classes_v=c // vec, stride_student_v=c // vec,
             stride_teacher_v=c // vec, stride_grad_v=c // vec, rows_bucket=kd_module._rows_bucket(n_rows),
             temperature=2.0, temperature_lo=0.0, div_weight=2.0, div_weight_lo=0.0, ce_weight=0.5, ce_weight_lo=0.0,
             beta=0.5, beta_lo=0.0, ignore_index=-100, soft_label_index=-100),
        dict(USE_DIV=True, DIV=0, HAS_LABELS=True, MASK_ROWS=True, COMPUTE_GRAD=True, TEMP_MODE=2, ACC=tl.float32,
             VEC=vec, CONTIGUOUS=True, FAST_MATH=True, BLOCK_ROWS=block_rows, BLOCK_C=block_c, SINGLE_TILE=single,
             EVEN_C=even_c),
        num_warps=warps)
    assert k.n_spills == 0, k.summary()
    # 128-bit accesses carry every tile: per thread, a tile of each input is this many 16-byte vectors
    vectors = block_rows * min(block_c, _next_pow2(c)) * elem // (16 * 32 * warps)
    # (the code has a copy for programs with all their rows and one for the last; the compiler may
    # share their loads, so one copy's worth is counted)
    tiles = 1 if single else (1 if even_c else 2)  # full tiles, then the partial one
    assert k.ld_global.get(128, 0) >= tiles * (2 if single else 4) * vectors, k.summary()
    assert k.st_global.get(128, 0) >= tiles * vectors, k.summary()
    if c == 2:  # flat runs and the label found in the tile: nothing narrower at all, but for the
        # reduction's scale, one 32-bit scalar in each of the code's two copies
        assert set(k.ld_global) <= {128, 32} and k.ld_global.get(32, 0) <= 2, k.summary()
        assert set(k.st_global) == {128}, k.summary()
    loops = ptx_loop_bodies(k.ptx)
    assert len(loops) == (0 if single else 2), k.summary()
    per_thread = block_c // (32 * warps)
    for body, (limit, exps) in zip(loops, [(30, 2), (18, 2)]):  # statistics, then gradient
        loads, stores = parse_global_access_bits("\n".join(body))
        assert set(loads) | set(stores) == {128}, (loads, stores)
        # bf16 pays an unpack per element that float32 does not; the statistics loop also reduces
        assert len(body) <= limit * per_thread, f"{len(body) / per_thread:.1f} PTX instructions per element"
        n_exp = sum(1 for line in body if line.startswith("ex2."))
        # and a few per tile, to rescale the running sums
        assert n_exp <= exps * per_thread + 3, f"{n_exp / per_thread:.2f} exponentials per element"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compiled_backward_scale_is_vectorised(dtype):
    tl = pytest.importorskip("triton.language")
    from sm90 import compile_sm90

    k = compile_sm90(kd_module._scale_kernel, dict(grad_ptr=f"*{dtype}", factor_ptr="*fp32", n_blocks=4096,
                                                   numel=4096 * 4096),
                     dict(ACC=tl.float32, BLOCK=4096, EVEN=True), num_warps=8)
    assert k.n_spills == 0 and set(k.ld_global) == {128, 32} and set(k.st_global) == {128}, k.summary()


@pytest.mark.parametrize("shape", [(37, 2), (37, 40), (16, 4)], ids=str)
def test_several_programs_and_a_partial_last_one(shape, monkeypatch, seed):
    # full programs run the copy without row masks, the last one the masked copy; outputs poisoned
    monkeypatch.setattr(kd_module, "_TILE_ELEMS_INTERPRETER", 256 if shape[1] > 4 else 16)
    poison_outputs(monkeypatch)
    student, teacher, labels = make_inputs(*shape, ignored=(3,))
    assert_finite_and_close("triton", student, teacher, labels, dict(temperature=2.0, alpha=0.3),
                            loss_tol=(1e-5, 1e-5), grad_tol=(1e-4, 1e-6))


@pytest.mark.parametrize("divergence", [1, 2], ids=["reverse_kl", "jsd"])
def test_compiled_other_divergences_stream_128_bit_without_spills(divergence):
    # reverse KL streams with one more running sum, the JSD takes one more pass over a streamed row:
    # a vocabulary-sized bf16 row through the widest streaming tile, every loop on 128-bit accesses
    tl = pytest.importorskip("triton.language")
    from sm90 import compile_sm90, parse_global_access_bits

    c, n_rows, (block_rows, block_c, warps) = 32000, 65536, (1, 4096, 8)
    vec = kd_module._vector_width(c, c, c, c)
    k = compile_sm90(
        kd_module._kd_loss_kernel,
        dict(student_ptr="*bf16", teacher_ptr="*bf16", labels_ptr="*i64", loss_ptr="*fp32", grad_ptr="*bf16",
             scale_ptr="*fp32", n_rows=n_rows, n_classes_v=c // vec, stride_student_v=c // vec,
             stride_teacher_v=c // vec, stride_grad_v=c // vec, rows_bucket=kd_module._rows_bucket(n_rows),
             temperature=2.0, temperature_lo=0.0, div_weight=2.0, div_weight_lo=0.0, ce_weight=0.5, ce_weight_lo=0.0,
             beta=0.5, beta_lo=0.0, ignore_index=-100, soft_label_index=-100),
        dict(USE_DIV=True, DIV=divergence, HAS_LABELS=True, MASK_ROWS=True, COMPUTE_GRAD=True, TEMP_MODE=2,
             ACC=tl.float32, VEC=vec, CONTIGUOUS=True, FAST_MATH=True, BLOCK_ROWS=block_rows, BLOCK_C=block_c,
             SINGLE_TILE=False, EVEN_C=False),
        num_warps=warps)
    assert k.n_spills == 0, k.summary()
    loops = ptx_loop_bodies(k.ptx)
    assert len(loops) >= (2 if divergence == 1 else 3), k.summary()  # statistics, (JSD sums), gradient
    for body in loops:
        loads, stores = parse_global_access_bits("\n".join(body))
        assert set(loads) | set(stores) == {128}, (loads, stores)
    if divergence == 1:  # the same instruction budget as forward KL's loops
        per_thread = block_c // (32 * warps)
        for body, limit in zip(loops, (30, 18)):
            assert len(body) <= limit * per_thread, f"{len(body) / per_thread:.1f} PTX instructions per element"
