import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sage_fast import check_values, use_backend
from sage_fast.ops.fused_linear_kd_loss import (
    default_chunk_size,
    fused_linear_kd_loss,
    fused_linear_kd_loss_reference,
)

# on a GPU machine the tensors below are CUDA tensors, so each chunk runs the compiled kernel
pytestmark = pytest.mark.usefixtures("cuda_by_default")


def make_inputs(n, h_s, h_t, v, *, dtype=torch.float64, bias=True, ignored=(), leading=None, scale=1.0):
    """Hidden states, head weights and biases, labels; heads scaled so the logits are a few units."""
    student_hidden = torch.randn(n, h_s, dtype=torch.float64) * scale
    teacher_hidden = torch.randn(n, h_t, dtype=torch.float64) * scale
    student_weight = torch.randn(v, h_s, dtype=torch.float64) * (2.0 / h_s**0.5)
    teacher_weight = torch.randn(v, h_t, dtype=torch.float64) * (2.0 / h_t**0.5)
    student_bias = torch.randn(v, dtype=torch.float64) if bias else None
    teacher_bias = torch.randn(v, dtype=torch.float64) if bias else None
    labels = torch.randint(0, v, (n,))
    for row in ignored:
        labels[row] = -100
    if leading is not None:
        student_hidden = student_hidden.reshape(*leading, h_s)
        teacher_hidden = teacher_hidden.reshape(*leading, h_t)
        labels = labels.reshape(leading)

    def cast(x):
        return None if x is None else x.to(dtype)

    return dict(student_hidden=cast(student_hidden), student_weight=cast(student_weight),
                teacher_hidden=cast(teacher_hidden), teacher_weight=cast(teacher_weight), labels=labels,
                student_bias=cast(student_bias), teacher_bias=cast(teacher_bias))


def leaves(inputs, dtype=None):
    """Fresh copies of the inputs (in ``dtype`` if given), the student's requiring grad."""
    out = {}
    for key, value in inputs.items():
        if value is None or key == "labels":
            out[key] = value
            continue
        value = value.detach().clone() if dtype is None else value.detach().to(dtype)
        out[key] = value.requires_grad_(key.startswith("student"))
    return out


def run(fn, inputs, *, weights=None, dtype=None, **kw):
    """(loss, grads of sum(weights * loss) for student hidden, weight, bias)."""
    x = leaves(inputs, dtype)
    loss = fn(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], x["labels"],
              student_bias=x["student_bias"], teacher_bias=x["teacher_bias"], **kw)
    wanted = [x["student_hidden"], x["student_weight"]] + ([x["student_bias"]] if x["student_bias"] is not None else [])
    total = loss.sum() if weights is None else (loss * weights).sum()
    grads = torch.autograd.grad(total, wanted)
    return loss.detach(), grads


def assert_matches_reference(inputs, *, rtol=1e-9, atol=1e-11, dtype=None, weights=None, **kw):
    loss, grads = run(fused_linear_kd_loss, inputs, dtype=dtype, weights=weights, **kw)
    kw.pop("chunk_size", None)
    ref_loss, ref_grads = run(fused_linear_kd_loss_reference, inputs, weights=weights, **kw)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad.double(), ref, rtol=rtol, atol=atol)


# each chunk's kd_loss on either of its paths: the Triton kernel (compiled on CUDA, interpreted on
# the CPU in CI) and the plain-torch one (the CPU's own, which the benchmarks time)
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(1, 4, 6, 5), (37, 8, 6, 53), (64, 16, 24, 300)], ids=str)
def test_matches_float64_reference(shape, reduction, backend, seed):
    n, h_s, h_t, v = shape
    inputs = make_inputs(n, h_s, h_t, v, ignored=(0, n - 1) if n > 2 else ())
    weights = torch.rand(n, dtype=torch.float64) if reduction == "none" else None
    with use_backend(backend):
        assert_matches_reference(inputs, weights=weights, temperature=2.0, alpha=0.3, reduction=reduction,
                                 chunk_size=max(1, n // 3))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_other_divergences_match_float64_reference(divergence, backend, seed):
    inputs = make_inputs(29, 8, 12, 47, ignored=(3, 4))
    inputs["labels"][7] = -1  # a soft-label row: the divergence, no cross-entropy
    with use_backend(backend):
        assert_matches_reference(inputs, temperature=1.5, alpha=0.7, divergence=divergence, beta=0.3,
                                 scale_by_t2=False, soft_label_index=-1, chunk_size=6)


@pytest.mark.parametrize("chunk_size", [1, 2, 9, 10, 11, 40, None])
def test_chunk_boundaries(chunk_size):
    # 10 rows: chunks of 1 and 2 divide them, 9 and 11 leave a short last chunk or one chunk, 40 is
    # larger than the batch
    torch.manual_seed(3)
    inputs = make_inputs(10, 8, 5, 31, ignored=())
    assert_matches_reference(inputs, temperature=1.5, alpha=0.6, chunk_size=chunk_size)


@pytest.mark.parametrize("bias", [True, False])
def test_ignored_rows_count_in_no_term_and_not_in_the_mean(bias, seed):
    inputs = make_inputs(23, 8, 6, 41, bias=bias, ignored=(0, 5, 6, 7, 22))
    assert_matches_reference(inputs, temperature=2.0, alpha=0.5, chunk_size=5)
    # the same loss as the counted rows alone
    keep = inputs["labels"] != -100
    kept = {k: (v[keep] if k in ("student_hidden", "teacher_hidden", "labels") else v) for k, v in inputs.items()}
    full, _ = run(fused_linear_kd_loss, inputs, temperature=2.0, alpha=0.5, chunk_size=5)
    alone, _ = run(fused_linear_kd_loss, kept, temperature=2.0, alpha=0.5, chunk_size=5)
    torch.testing.assert_close(full, alone, rtol=1e-12, atol=1e-12)


def test_every_row_ignored_gives_zero_loss_and_gradient():
    torch.manual_seed(0)
    inputs = make_inputs(6, 4, 4, 9, ignored=range(6))
    loss, grads = run(fused_linear_kd_loss, inputs, alpha=0.5, chunk_size=4)
    assert float(loss) == 0.0
    assert all(bool((g == 0).all()) for g in grads)


def test_without_labels_every_row_counts(seed):
    inputs = make_inputs(19, 8, 8, 33)
    inputs["labels"] = None
    assert_matches_reference(inputs, temperature=3.0, chunk_size=4)


def test_leading_shape_and_per_example(seed):
    inputs = make_inputs(24, 8, 6, 29, leading=(3, 8), ignored=(2, 9))
    x = leaves(inputs)
    loss, per_example = fused_linear_kd_loss(
        x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], x["labels"],
        student_bias=x["student_bias"], teacher_bias=x["teacher_bias"], temperature=2.0, alpha=0.5, chunk_size=5,
        return_per_example=True)
    assert per_example.shape == (3, 8) and per_example.dtype == torch.float32
    ref_rows = fused_linear_kd_loss_reference(
        inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"], inputs["teacher_weight"],
        inputs["labels"], student_bias=inputs["student_bias"], teacher_bias=inputs["teacher_bias"], temperature=2.0,
        alpha=0.5, reduction="none")
    torch.testing.assert_close(per_example, ref_rows.float(), rtol=1e-6, atol=1e-6)
    flat = {k: (None if v is None else v.reshape(24, -1).squeeze(-1) if k == "labels" else
                v.reshape(24, v.shape[-1]) if k.endswith("hidden") else v) for k, v in inputs.items()}
    flat_loss, _ = run(fused_linear_kd_loss, flat, temperature=2.0, alpha=0.5, chunk_size=5)
    torch.testing.assert_close(loss.detach(), flat_loss, rtol=1e-12, atol=1e-12)
    rows = fused_linear_kd_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                                x["labels"], temperature=2.0, alpha=0.5, reduction="none")
    assert rows.shape == (3, 8)


@pytest.mark.parametrize("num_items", [7, "tensor"])
def test_num_items_in_batch_divides_the_sum(num_items, seed):
    inputs = make_inputs(17, 8, 6, 23, ignored=(3,))
    n = torch.tensor(7) if num_items == "tensor" else num_items
    loss, grads = run(fused_linear_kd_loss, inputs, alpha=0.5, num_items_in_batch=n, chunk_size=6)
    ref_loss, ref_grads = run(fused_linear_kd_loss_reference, inputs, alpha=0.5, reduction="sum")
    torch.testing.assert_close(loss, ref_loss / 7, rtol=1e-12, atol=1e-12)
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref / 7, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_close_to_float64(dtype, seed):
    inputs = make_inputs(33, 16, 12, 70, ignored=(4,))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-3)
    loss, grads = run(fused_linear_kd_loss, inputs, dtype=dtype, temperature=2.0, alpha=0.5, chunk_size=8)
    assert loss.dtype == torch.float32 and grads[0].dtype == dtype and grads[1].dtype == dtype
    # the float64 reference of the rounded inputs: only the op's own rounding is measured
    rounded = {k: (None if v is None or k == "labels" else v.to(dtype).double()) for k, v in inputs.items()}
    rounded["labels"] = inputs["labels"]
    ref_loss, ref_grads = run(fused_linear_kd_loss_reference, rounded, temperature=2.0, alpha=0.5)
    torch.testing.assert_close(loss.double(), ref_loss, **tol)
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad.double(), ref, **tol)


def test_large_magnitudes(seed):
    # hidden states of 100: logits in the hundreds, where an unshifted softmax overflows float32's exp
    inputs = make_inputs(12, 8, 8, 37, dtype=torch.float32, scale=100.0, ignored=(1,))
    kw = dict(temperature=4.0, alpha=0.5)
    loss, grads = run(fused_linear_kd_loss, inputs, chunk_size=5, **kw)
    ref_loss, ref_grads = run(fused_linear_kd_loss_reference, inputs, dtype=torch.float64, **kw)
    assert bool(torch.isfinite(loss))
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    for grad, ref in zip(grads, ref_grads, strict=True):
        # float32 logits of a few hundred carry absolute errors of ~1e-5 into the softmax
        torch.testing.assert_close(grad.double(), ref, rtol=1e-4, atol=1e-4)


def test_under_autocast_the_heads_run_in_its_dtype_and_gradients_keep_theirs():
    torch.manual_seed(0)
    inputs = make_inputs(20, 16, 8, 40, dtype=torch.float32, ignored=(2,))
    device_type = inputs["student_hidden"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16):
        loss, grads = run(fused_linear_kd_loss, inputs, temperature=2.0, alpha=0.5, chunk_size=6)
        ref_loss, ref_grads = run(fused_linear_kd_loss_reference, inputs, temperature=2.0, alpha=0.5)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-2)
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref, rtol=3e-2, atol=3e-3)


def test_incoming_gradient_scales_and_retained_graph_keeps_the_gradient(seed):
    inputs = make_inputs(11, 8, 6, 19)
    x = leaves(inputs)
    loss = fused_linear_kd_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                                x["labels"], student_bias=x["student_bias"], teacher_bias=x["teacher_bias"], alpha=0.5,
                                chunk_size=4)
    first = torch.autograd.grad(loss * 3.0, x["student_weight"], retain_graph=True)[0]
    second = torch.autograd.grad(loss, x["student_weight"])[0]
    torch.testing.assert_close(first, 3.0 * second, rtol=1e-12, atol=1e-14)
    _, (_, ref, _) = run(fused_linear_kd_loss_reference, inputs, alpha=0.5)
    torch.testing.assert_close(second, ref, rtol=1e-9, atol=1e-12)


def test_teacher_gets_no_gradient_and_frozen_student_parts_get_none():
    torch.manual_seed(0)
    inputs = make_inputs(9, 4, 4, 11)
    teacher_hidden = inputs["teacher_hidden"].clone().requires_grad_(True)
    teacher_weight = inputs["teacher_weight"].clone().requires_grad_(True)
    student_hidden = inputs["student_hidden"].clone().requires_grad_(True)
    loss = fused_linear_kd_loss(student_hidden, inputs["student_weight"], teacher_hidden, teacher_weight,
                                inputs["labels"], alpha=0.5, chunk_size=4)
    loss.backward()
    assert teacher_hidden.grad is None and teacher_weight.grad is None
    assert student_hidden.grad is not None and bool(student_hidden.grad.abs().sum() > 0)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op makes, in bytes (the Triton interpreter views its arguments'
    storage as bytes)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel() * value.element_size())
        return out


@pytest.mark.parametrize("fn", [fused_linear_kd_loss, fused_linear_kd_loss_reference], ids=["fused", "eager"])
def test_no_full_logits_are_ever_allocated(fn):
    n, v, h = 64, 300, 16
    torch.manual_seed(0)
    inputs = make_inputs(n, h, h, v, dtype=torch.float32, ignored=(3,))
    x = leaves(inputs)
    with _LargestTensor() as mode:
        loss = fn(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], x["labels"],
                  student_bias=x["student_bias"], teacher_bias=x["teacher_bias"], alpha=0.5, chunk_size=n // 4)
        loss.backward()
    if fn is fused_linear_kd_loss_reference:
        # the check can fail: the eager composition makes [N, V] matrices
        assert mode.largest >= n * v * 4
    else:
        assert mode.largest <= (n // 4) * v * 4


def test_default_chunk_size():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_chunk_size(4096, 32000, cpu) == 512
    assert default_chunk_size(16384, 128256, cuda) == 1024
    assert default_chunk_size(10, 32000, cpu) == 10
    assert default_chunk_size(1 << 20, 10**7, cpu) == 16  # never thinner than MIN_CHUNK_ROWS


def _bad(**changes):
    torch.manual_seed(0)
    inputs = make_inputs(6, 4, 5, 7, dtype=torch.float32)
    inputs.update(changes)
    return inputs


@pytest.mark.parametrize("changes, message", [
    (dict(student_weight=torch.randn(7, 5)), "student_weight must be"),
    (dict(teacher_weight=torch.randn(7, 4)), "teacher_weight must be"),
    (dict(teacher_weight=torch.randn(8, 5)), "teacher_weight has 8 rows"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), "labels must have"),
    (dict(labels=torch.zeros(6)), "labels must have an integer dtype"),
    (dict(labels=torch.full((6,), 7)), "labels must lie in"),
    (dict(student_bias=torch.randn(8)), "student_bias must have shape"),
    (dict(teacher_bias=torch.randn(7, 1)), "teacher_bias must have shape"),
    (dict(teacher_hidden=torch.randn(5, 5)), "teacher_hidden must have"),
    (dict(student_hidden=torch.randn(6, 4, dtype=torch.float64)), "student_weight and student_hidden"),
    (dict(student_hidden=torch.randn(0, 4), teacher_hidden=torch.randn(0, 5), labels=torch.zeros(0, dtype=torch.long)),
     "student_hidden holds no rows"),
    (dict(student_weight=torch.randn(7)), "student_weight must have 2 dimensions"),
])
def test_bad_input_names_the_argument(changes, message):
    x = _bad(**changes)
    # values (a label out of range) are checked on CUDA tensors too when asked
    check_values(True)
    try:
        with pytest.raises(ValueError, match=message):
            fused_linear_kd_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                                 x["labels"], student_bias=x["student_bias"], teacher_bias=x["teacher_bias"])
    finally:
        check_values(None)


@pytest.mark.parametrize("kw, message", [
    (dict(chunk_size=0), "chunk_size"), (dict(chunk_size=2.5), "chunk_size"), (dict(temperature=0.0), "temperature"),
    (dict(alpha=1.5), "alpha"), (dict(reduction="avg"), "reduction"), (dict(divergence="kl"), "divergence"),
    (dict(beta=2.0), "beta"), (dict(num_items_in_batch=0), "num_items_in_batch"),
    (dict(num_items_in_batch=3, reduction="none"), "num_items_in_batch"),
    (dict(scale_by_t2="yes"), "scale_by_t2"), (dict(soft_label_index=-100), "soft_label_index"),
])
def test_bad_keywords_name_the_argument(kw, message):
    x = _bad()
    with pytest.raises(ValueError, match=message):
        fused_linear_kd_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                             x["labels"], **kw)


def _float32_leaves(inputs):
    return leaves(inputs, torch.float32)


@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("num_items", [None, 9])
def test_jsd_matches_trl_generalized_jsd_loss(beta, num_items, seed):
    pytest.importorskip("trl")
    from trl.experimental.gkd import GKDTrainer

    inputs = make_inputs(24, 16, 12, 50, bias=False, leading=(3, 8), ignored=(0, 1, 2, 13))
    kw = dict(temperature=2.0, beta=beta)
    x = _float32_leaves(inputs)
    ours = fused_linear_kd_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                                x["labels"], divergence="jsd", scale_by_t2=False, num_items_in_batch=num_items,
                                chunk_size=7, **kw)
    grads = torch.autograd.grad(ours, [x["student_hidden"], x["student_weight"]])
    y = _float32_leaves(inputs)
    theirs = GKDTrainer.generalized_jsd_loss(y["student_hidden"] @ y["student_weight"].t(),
                                             y["teacher_hidden"] @ y["teacher_weight"].t(), y["labels"],
                                             num_items_in_batch=num_items, **kw)
    their_grads = torch.autograd.grad(theirs, [y["student_hidden"], y["student_weight"]])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for grad, their in zip(grads, their_grads, strict=True):
        torch.testing.assert_close(grad, their, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha, beta, temperature", [(1.0, 0.5, 1.0), (0.5, 0.3, 2.0), (0.2, 0.9, 1.0)])
def test_jsd_matches_liger_fused_linear_jsd_loss(alpha, beta, temperature, seed):
    pytest.importorskip("liger_kernel")
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    inputs = make_inputs(40, 16, 24, 64, ignored=(5, 6, 39))
    x = _float32_leaves(inputs)
    ours = fused_linear_kd_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                                x["labels"], student_bias=x["student_bias"], teacher_bias=x["teacher_bias"],
                                divergence="jsd", beta=beta, alpha=alpha, temperature=temperature, scale_by_t2=False,
                                chunk_size=16)
    grads = torch.autograd.grad(ours, [x["student_hidden"], x["student_weight"], x["student_bias"]])
    y = _float32_leaves(inputs)
    liger = LigerFusedLinearJSDLoss(weight_hard_loss=1.0 - alpha, weight_soft_loss=alpha, beta=beta,
                                    temperature=temperature, compiled=False, chunk_size=16)
    theirs = liger(y["student_hidden"], y["student_weight"], y["teacher_hidden"], y["teacher_weight"], y["labels"],
                   y["student_bias"], y["teacher_bias"])
    their_grads = torch.autograd.grad(theirs, [y["student_hidden"], y["student_weight"], y["student_bias"]])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for grad, their in zip(grads, their_grads, strict=True):
        torch.testing.assert_close(grad, their, rtol=1e-5, atol=1e-5)
