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
        ("attention_mask has values other than 0 and 1", dict(attention_mask=mask * 2)),
        ("attention_mask has values other than 0 and 1", dict(attention_mask=torch.tensor([[1, 1, 0], [1, -1, 0]]))),
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


@pytest.mark.parametrize("checked", [True, False])
def test_mask_values_checked_only_where_values_are_checked(monkeypatch, checked):
    """The 0/1 check reads the mask on the host (a sync on CUDA): it runs only when
    _checks.values_checked says so; unchecked, any non-zero value counts as a valid token."""
    seen = []

    def values_checked(value):
        seen.append(value)
        return checked

    monkeypatch.setattr(align_module._checks, "values_checked", values_checked)
    s, t = make_pairs(2, 3, 4, requires_grad=False)
    mask = torch.tensor([[2, 1, 0], [1, 0, 0]])
    assert len(seen) == 0
    if checked:
        with pytest.raises(ValueError, match="values other than 0 and 1"):
            align_loss(s, t, mask)
    else:
        loss = align_loss(s, t, mask, reduction="none")
        torch.testing.assert_close(loss.double(), align_loss_reference(s, t, mask != 0, reduction="none"))
    assert len(seen) == 1 and seen[0] is mask


def test_tiles_fit_the_hidden_size():
    tiles = align_module._tiles([768] * 4, 128, [128 * 768, 768] * 8, 2, interpret=False)
    assert (tiles.block_h, tiles.h_chunks, tiles.block_t, tiles.mask_h) == (512, 1, 256, False)
    assert (tiles.block_l, tiles.vec, tiles.num_warps) == (8, 8, 8)
    tiles = align_module._tiles([1024, 768], 64, [64 * 1024, 1024], 4, interpret=False)
    assert (tiles.block_h, tiles.h_chunks, tiles.block_t, tiles.mask_h, tiles.vec) == (1024, 1, 0, True, 4)
    tiles = align_module._tiles([5000], 16, [16 * 5000, 5000], 2, interpret=False)
    assert (tiles.block_h, tiles.h_chunks, tiles.block_t, tiles.mask_h, tiles.vec) == (4096, 1, 1024, True, 8)
    tiles = align_module._tiles([12], 7, [84, 12], 2, interpret=False)  # 12 = 8 + 4; strides allow 8-byte vectors
    assert (tiles.block_h, tiles.block_t, tiles.mask_h, tiles.vec) == (8, 4, False, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_block, hidden", [(4096, [24, 24]), (16, [48, 48]), (16, [40, 40]), (16, [40, 33])],
                         ids=["main+tail", "3-chunks", "2-chunks+tail", "chunks+tail+mask"])
def test_exact_and_chunked_hidden_tiles(monkeypatch, backend, max_block, hidden):
    """Every tiling of H: one tile and a tail in registers, chunks walked twice for cosine, and the
    column mask only where some pair's H is not covered exactly."""
    monkeypatch.setattr(align_module, "MAX_BLOCK_H", max_block)
    torch.manual_seed(8)
    student, teacher = make_pairs(3, 5, hidden, pairs=2)
    mask = make_mask(3, 5, fully_masked_rows=[2])
    with use_backend(backend):
        for cosine_weight in (0.0, 0.7):
            assert_matches(student, teacher, mask, cosine_weight=cosine_weight, layer_weights=[0.5, 2.0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_twice_through_a_kept_graph(backend, reduction):
    """The first backward scales the stored gradient in place; further backwards through a graph kept
    with retain_graph=True must still see the unscaled gradient."""
    torch.manual_seed(9)
    student, teacher = make_pairs(3, 4, 10, pairs=2)
    mask = make_mask(3, 4)
    student64 = [s.detach().double().requires_grad_() for s in student]
    ref = align_loss_reference(student64, teacher, mask, cosine_weight=0.5, reduction=reduction)
    with use_backend(backend):
        loss = align_loss(student, teacher, mask, cosine_weight=0.5, reduction=reduction)
        for upstream in (torch.ones_like(loss), 3.0 * torch.ones_like(loss), torch.rand_like(loss) - 0.5):
            grads = torch.autograd.grad(loss, student, upstream, retain_graph=True)
            ref_grads = torch.autograd.grad(ref, student64, upstream.double(), retain_graph=True)
            for g, r in zip(grads, ref_grads):
                torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduction_none_summed_gives_a_broadcast_upstream_gradient(backend):
    """loss.sum() hands backward an expanded (stride 0) gradient of ones."""
    torch.manual_seed(10)
    student, teacher = make_pairs(4, 3, 9, pairs=1)
    with use_backend(backend):
        (grad,) = torch.autograd.grad(align_loss(student, teacher, reduction="none").sum(), student)
    student64 = [student[0].detach().double().requires_grad_()]
    (ref,) = torch.autograd.grad(align_loss_reference(student64, teacher, reduction="sum"), student64)
    torch.testing.assert_close(grad.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_synchronisation_on_cuda():
    student, teacher = make_pairs(4, 16, 64, pairs=3, device="cuda")
    mask = make_mask(4, 16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for reduction in ("mean", "none"):
            loss = align_loss(student, teacher, mask, cosine_weight=0.5, reduction=reduction)
            torch.autograd.grad(loss, student, torch.full_like(loss, 2.0))
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------------------ compiled for sm_90
def _sm90_args(dtype: str, pairs: int, n: int, length: int, hidden: int, tiles):
    each = lambda v: (v,) * pairs  # noqa: E731 - one entry per layer pair (a tuple argument)
    return dict(student=each(f"*{dtype}"), teacher=each(f"*{dtype}"), grad=each(f"*{dtype}"),
                s_row_stride=each(length * hidden), s_token_stride=each(hidden),
                t_row_stride=each(length * hidden), t_token_stride=each(hidden), hidden=each(hidden),
                mse_coef=each(1.0), cos_coef=each(0.5), mask_ptr="*i64", mask_row_stride=length, mask_token_stride=1,
                partial_ptr="*fp32", N=n, L=length, token_blocks=length // tiles.block_l)


@pytest.mark.parametrize("dtype, itemsize", [("bf16", 2), ("fp32", 4)])
@pytest.mark.parametrize("cosine", [False, True], ids=["mse", "mse+cos"])
def test_sm90_codegen_vectorised_without_spills(dtype, itemsize, cosine):
    """The benchmarked shape (4 layers x 32 x 128 x 768), compiled for Hopper: every load of s and t
    and every store of the gradient is a 16-byte vector, and nothing spills."""
    from sm90 import compile_sm90

    pairs, n, length, hidden = 4, 32, 128, 768
    tiles = align_module._tiles([hidden] * pairs, length, [length * hidden, hidden] * 2 * pairs, itemsize,
                                interpret=False)
    k = compile_sm90(
        align_module._align_loss_kernel, _sm90_args(dtype, pairs, n, length, hidden, tiles),
        dict(PAIRS=pairs, HAS_MASK=True, MEAN=True, USE_MSE=True, USE_COSINE=cosine, COMPUTE_GRAD=True,
             BLOCK_L=tiles.block_l, BLOCK_H=tiles.block_h, H_CHUNKS=tiles.h_chunks, BLOCK_T=tiles.block_t,
             MASK_H=tiles.mask_h, COUNT_BLOCK=length, VEC=tiles.vec, WIDE=False, EPS=1e-8),
        num_warps=tiles.num_warps)
    vectors = tiles.block_l * hidden * itemsize // 16 // (32 * tiles.num_warps)  # per thread, per tensor
    assert vectors >= 1
    assert k.ld_global.get(128, 0) == 2 * vectors, k.summary()  # s and t
    assert k.st_global.get(128, 0) == vectors, k.summary()      # the gradient
    assert set(k.st_global) <= {128, 32}, k.summary()           # else only the partial loss
    assert k.n_spills == 0 and k.n_regs <= 128, k.summary()


def test_sm90_codegen_backward_scale():
    from sm90 import compile_sm90

    k = compile_sm90(align_module._scale_kernel,
                     dict(grad=("*bf16",) * 4, row_elements=(128 * 768,) * 4, chunks=24, scale_ptr="*fp32",
                          scale_stride=0),
                     dict(PAIRS=4, BLOCK=align_module.SCALE_BLOCK), num_warps=4)
    assert set(k.ld_global) == {128, 32} and set(k.st_global) == {128}, k.summary()
    assert k.n_spills == 0, k.summary()
