import importlib
import re

import pytest
import torch

from sage_fast import use_backend
from sage_fast.ops.align_loss import align_loss, align_loss_reference

# the package exports the function under the module's name, so reach the module itself
align_module = importlib.import_module("sage_fast.ops.align_loss")

BACKENDS = ["triton", "torch"]

# on a GPU machine the tensors below are CUDA tensors, so "triton" runs the compiled kernel
pytestmark = pytest.mark.usefixtures("cuda_by_default")


def make_pairs(n, length, hidden, pairs=1, dtype=torch.float32, requires_grad=True, device=None):
    hidden = [hidden] * pairs if isinstance(hidden, int) else hidden
    student = [torch.randn(n, length, h, dtype=dtype, device=device).requires_grad_(requires_grad) for h in hidden]
    teacher = [torch.randn(n, length, h, dtype=dtype, device=device) for h in hidden]
    return student, teacher


def make_mask(n, length, fully_masked_rows=(), device=None):
    mask = (torch.rand(n, length, device=device) > 0.3).long()
    mask[:, 0] = 1
    for row in fully_masked_rows:
        mask[row] = 0
    return mask


def reference(student, teacher, mask, **kwargs):
    student64 = [s.detach().double().requires_grad_() for s in student]
    loss = align_loss_reference(student64, [t.double() for t in teacher], mask, **kwargs)
    grads = torch.autograd.grad(loss.sum(), student64)
    return loss, align_loss_reference(student64, teacher, mask, **{**kwargs, "reduction": "none"}).detach(), grads


def assert_matches(student, teacher, mask, atol=1e-5, rtol=1e-5, **kwargs):
    loss, per_example = align_loss(student, teacher, mask, return_per_example=True, **kwargs)
    grads = torch.autograd.grad(loss.sum(), student)
    ref_loss, ref_per_example, ref_grads = reference(student, teacher, mask, **kwargs)
    assert per_example.dtype == torch.float32 and not per_example.requires_grad
    torch.testing.assert_close(loss.double(), ref_loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(per_example.double(), ref_per_example, atol=atol, rtol=rtol)
    for g, ref_g, s in zip(grads, ref_grads, student):
        assert g.dtype == s.dtype and g.shape == s.shape
        torch.testing.assert_close(g.double(), ref_g, atol=atol, rtol=rtol)
    return loss, per_example, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mse_weight, cosine_weight", [(1.0, 0.0), (0.0, 1.0), (0.7, 0.3)], ids=["mse", "cos", "both"])
@pytest.mark.parametrize("n, length, hidden, pairs", [(1, 1, 8, 1), (3, 7, 13, 3), (5, 9, 37, 1), (2, 17, 8, 2)])
def test_matches_float64_reference(seed, backend, mse_weight, cosine_weight, n, length, hidden, pairs):
    student, teacher = make_pairs(n, length, hidden, pairs)
    mask = make_mask(n, length, fully_masked_rows=[n - 1] if n > 2 else ())
    with use_backend(backend):
        _, per_example, grads = assert_matches(student, teacher, mask, mse_weight=mse_weight,
                                               cosine_weight=cosine_weight, layer_weights=[0.5 + p for p in range(pairs)])
    if n > 2:
        assert per_example[n - 1] == 0
        assert all(bool((g[n - 1] == 0).all()) for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_backward_scale(backend, reduction):
    torch.manual_seed(0)
    student, teacher = make_pairs(4, 5, 11, pairs=2)
    mask = make_mask(4, 5, fully_masked_rows=[2])
    upstream = torch.rand(4) if reduction == "none" else torch.tensor(2.5)
    with use_backend(backend):
        loss = align_loss(student, teacher, mask, cosine_weight=0.5, reduction=reduction)
        grads = torch.autograd.grad(loss, student, upstream)
    ref_loss, _, _ = reference(student, teacher, mask, cosine_weight=0.5, reduction=reduction)
    student64 = [s.detach().double().requires_grad_() for s in student]
    ref = align_loss_reference(student64, teacher, mask, cosine_weight=0.5, reduction=reduction)
    ref_grads = torch.autograd.grad(ref, student64, upstream.double())
    assert loss.shape == ref_loss.shape
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-5)
    for g, ref_g in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), ref_g, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_wider_than_one_block(monkeypatch, seed, backend):
    monkeypatch.setattr(align_module, "MAX_BLOCK_H", 16)
    student, teacher = make_pairs(3, 4, [40, 33], pairs=2)
    mask = make_mask(3, 4, fully_masked_rows=[1])
    with use_backend(backend):
        for cosine_weight in (0.0, 0.6):
            assert_matches(student, teacher, mask, cosine_weight=cosine_weight)


@pytest.mark.parametrize("hidden", [align_module.MAX_BLOCK_H, align_module.MAX_BLOCK_H + 1], ids=["one", "two"])
def test_largest_block_and_one_past_it(hidden):
    torch.manual_seed(6)
    student, teacher = make_pairs(2, 3, hidden, pairs=2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    with use_backend("triton"):
        assert_matches(student, teacher, mask, cosine_weight=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_mask_and_pairs_of_different_widths(backend):
    torch.manual_seed(1)
    student, teacher = make_pairs(3, 6, [8, 24, 5], pairs=3)
    with use_backend(backend):
        assert_matches(student, teacher, None, mse_weight=0.3, cosine_weight=2.0, layer_weights=[1.0, 0.0, 3.0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_accumulates_in_float32(backend, dtype):
    torch.manual_seed(2)
    student, teacher = make_pairs(3, 5, 24, pairs=2, dtype=dtype)
    mask = make_mask(3, 5)
    with use_backend(backend):
        loss, _, _ = assert_matches(student, teacher, mask, atol=2e-2, rtol=2e-2, cosine_weight=0.5)
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    torch.manual_seed(3)
    student = [torch.randn(12, 4, 9).permute(1, 0, 2)[:, ::2].detach().requires_grad_(),
               torch.randn(4, 6, 18)[:, :, ::2].detach().requires_grad_()]
    teacher = [torch.randn(4, 9, 6).transpose(1, 2), torch.randn(9, 6, 4).permute(2, 1, 0)]
    assert not any(x.is_contiguous() for x in student + teacher)
    mask = make_mask(6, 4).t()
    with use_backend(backend):
        assert_matches(student, teacher, mask, cosine_weight=0.4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    torch.manual_seed(4)
    student, teacher = make_pairs(2, 3, 4, pairs=2, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    with use_backend(backend):
        for reduction in ("mean", "none"):
            def fn(*s, reduction=reduction):
                return align_loss(list(s), teacher, mask, mse_weight=0.5, cosine_weight=1.0,
                                  layer_weights=[1.0, 2.0], reduction=reduction)
            assert torch.autograd.gradcheck(fn, tuple(student), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_student_vector_uses_clamped_norm(backend):
    student, teacher = make_pairs(2, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        student[0][0, 1] = 0
    with use_backend(backend):
        assert_matches(student, teacher, None, cosine_weight=1.0)


def test_every_output_written_and_finite(monkeypatch):
    """Poisons the buffers the kernel writes: an element it skips would stay NaN."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    torch.manual_seed(5)
    student, teacher = make_pairs(3, 7, [19, 6], pairs=2)
    mask = make_mask(3, 7, fully_masked_rows=[0])
    monkeypatch.setattr(align_module.torch, "empty", poisoned_empty)
    with use_backend("triton"):
        loss, per_example = align_loss(student, teacher, mask, cosine_weight=1.0, return_per_example=True)
        grads = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss).all() and torch.isfinite(per_example).all()
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_untouched_teacher_gets_no_gradient(backend):
    student, teacher = make_pairs(2, 4, 6, pairs=2)
    teacher = [t.requires_grad_() for t in teacher]
    mask = make_mask(2, 4)
    before = [x.detach().clone() for x in student + teacher] + [mask.clone()]
    with use_backend(backend):
        loss = align_loss(student, teacher, mask, cosine_weight=1.0)
    loss.backward()
    assert all(t.grad is None for t in teacher) and all(s.grad is not None for s in student)
    assert all(torch.equal(a, b) for a, b in zip(before, [x.detach() for x in student + teacher] + [mask]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_bool_mask(backend):
    student, teacher = make_pairs(3, 4, 6, requires_grad=False)
    mask = make_mask(3, 4)
    with use_backend(backend):
        loss = align_loss(student, teacher, mask.bool(), cosine_weight=0.5)
    assert not loss.requires_grad
    ref = align_loss_reference(student, teacher, mask, cosine_weight=0.5)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)


def test_cosine_matches_torch_cosine_similarity():
    student, teacher = make_pairs(2, 3, 7, dtype=torch.float64, requires_grad=False)
    loss = align_loss(student, teacher, mse_weight=0.0, cosine_weight=1.0, reduction="none")
    expected = (1 - torch.nn.functional.cosine_similarity(student[0], teacher[0], dim=-1, eps=1e-8)).mean(dim=1)
    torch.testing.assert_close(loss, expected)


def bad_inputs():
    s, t = make_pairs(2, 3, 4, pairs=2, requires_grad=False)
    mask = torch.ones(2, 3, dtype=torch.long)
    return [
        ("student_hidden", dict(student_hidden=s[0])),
        ("student_hidden", dict(student_hidden=[])),
        ("teacher_hidden", dict(teacher_hidden=[])),
        ("same number of layers", dict(teacher_hidden=t[:1])),
        ("must have the same shape", dict(teacher_hidden=[t[0][:, :2], t[1]])),
        ("same dtype", dict(teacher_hidden=[t[0].double(), t[1]])),
        ("student_hidden[1]", dict(student_hidden=[s[0], s[1].double()], teacher_hidden=[t[0], t[1].double()])),
        ("3 dimensions", dict(student_hidden=[s[0][0], s[1]])),
        ("share N and L", dict(student_hidden=[s[0], s[1][:1]], teacher_hidden=[t[0], t[1][:1]])),
        ("empty batch", dict(student_hidden=[x[:0] for x in s], teacher_hidden=[x[:0] for x in t])),
        ("dtype in", dict(student_hidden=[x.long() for x in s], teacher_hidden=[x.long() for x in t])),
        ("attention_mask must have shape", dict(attention_mask=mask[:, :2])),
        ("attention_mask must have 2 dimensions", dict(attention_mask=mask[0])),
        ("bool or integer", dict(attention_mask=mask.float())),
        ("mse_weight", dict(mse_weight=-1.0)),
        ("cosine_weight", dict(cosine_weight=float("nan"))),
        ("both 0", dict(mse_weight=0.0, cosine_weight=0.0)),
        ("layer_weights", dict(layer_weights=[1.0])),
        ("layer_weights[1]", dict(layer_weights=[1.0, -0.5])),
        ("reduction", dict(reduction="max")),
    ], (s, t, mask)


@pytest.mark.parametrize("case", range(len(bad_inputs()[0])))
def test_bad_input_raises_before_launch(monkeypatch, case):
    cases, (s, t, mask) = bad_inputs()
    message, overrides = cases[case]

    def no_launch(*args, **kwargs):
        raise AssertionError("launched on bad input")

    monkeypatch.setattr(align_module, "_launch", no_launch)
    monkeypatch.setattr(align_module, "_torch_path", no_launch)
    kwargs = dict(student_hidden=s, teacher_hidden=t, attention_mask=mask)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=re.escape(message)):
        align_loss(**kwargs)


def test_device_mismatch_raises():
    s, t = make_pairs(2, 3, 4, requires_grad=False)
    meta = [x.to("meta") for x in t]
    with pytest.raises(ValueError, match="same device"):
        align_loss(s, meta)
    with pytest.raises(ValueError, match="attention_mask"):
        align_loss(s, t, torch.ones(2, 3, dtype=torch.long, device="meta"))
