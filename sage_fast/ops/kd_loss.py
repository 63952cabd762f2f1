"""Fused knowledge-distillation loss: tempered KL to the teacher plus cross-entropy to the labels.

For row ``i`` with student logits ``s``, teacher logits ``t``, label ``y``, temperature ``T`` and
weight ``alpha``::

    l_i = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)

    KL  = sum_j p_t_j * (t_j - s_j) / T  -  lse(t/T)  +  lse(s/T),      p_t = softmax(t/T)
    CE  = lse(s) - s_y          (0 where y == ignore_index, or when no labels are given)

CE uses the untempered student logits. The gradient with respect to the student is::

    dl_i/ds_j = alpha * T * (softmax(s/T)_j - p_t_j)  +  (1 - alpha) * (softmax(s)_j - [j == y])

One pass over the row gathers every statistic (running maxima and sums of exponentials of ``s/T``,
``t/T`` and ``s``, and ``sum_j exp(t_j/T - m) * (t_j - s_j)/T``, rescaled whenever a running maximum
grows), so the class dimension is tiled and rows of any width stream through. A second pass writes
``dl_i/ds`` in the student's dtype; backward only scales it by the incoming gradient. When nothing
needs a gradient (evaluation, error-profile refresh) the second pass is skipped.

The teacher is a target: no gradient flows to ``teacher_logits`` even if it requires one.
"""
from __future__ import annotations

import struct

import torch

from .. import _checks
from .._backend import use_triton

__all__ = ["kd_loss", "kd_loss_reference"]

REDUCTIONS = ("mean", "sum", "none")

# Largest class tile. Rows wider than this are streamed tile by tile.
MAX_BLOCK_C = 4096
# Elements a program holds per tile: a 2-D block of rows x classes, so narrow rows share a program.
_TILE_ELEMS_GPU = 4096
_TILE_ELEMS_INTERPRETER = 16384
# Rows of the plain-torch path are processed in chunks of about this many elements, so that the
# temporaries stay small (and in cache) instead of growing with the batch.
_TORCH_CHUNK_ELEMS = 1 << 18
_TORCH_MIN_CHUNK_ELEMS = 1 << 14
# Rows this narrow go through the plain-torch path transposed (classes along dimension 0).
_TORCH_TRANSPOSE_MAX_C = 16
# Tests set this to fill the outputs with NaN before the launch, so that unwritten elements show up.
_POISON_OUTPUTS = False

try:  # triton is optional at import time: without it every tensor takes the plain-torch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

if triton is not None:
    # stands in for -inf on masked lanes (exp(_NEG - m) is exactly 0); a constexpr, as compiled
    # kernels may only read constexpr globals
    _NEG = tl.constexpr(-1.0e30)

    @triton.jit
    def _kd_loss_kernel(
        student_ptr, teacher_ptr, labels_ptr, loss_ptr, grad_ptr,
        n_rows, n_classes, stride_student, stride_teacher, stride_grad,
        temperature, temperature_lo, alpha, alpha_lo, grad_scale, grad_scale_lo, ignore_index,
        USE_KL: tl.constexpr, HAS_LABELS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
        ACC: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        student_rows = student_ptr + rows64[:, None] * stride_student
        teacher_rows = teacher_ptr + rows64[:, None] * stride_teacher

        # scalars arrive as float32 pairs (value, remainder) so float64 inputs keep float64 precision
        temp = tl.cast(temperature, ACC) + tl.cast(temperature_lo, ACC)
        inv_t = 1.0 / temp
        kd_weight = tl.cast(alpha, ACC) + tl.cast(alpha_lo, ACC)
        ce_weight = 1.0 - kd_weight

        # running max / sum of exp for s/T (m_st, d_st), t/T (m_tt, d_tt) and s (m_s, d_s);
        # cross = sum_j exp(t_j/T - m_tt) * (t_j - s_j)/T
        m_st = tl.full([BLOCK_ROWS], _NEG, ACC)
        d_st = tl.zeros([BLOCK_ROWS], ACC)
        m_tt = tl.full([BLOCK_ROWS], _NEG, ACC)
        d_tt = tl.zeros([BLOCK_ROWS], ACC)
        cross = tl.zeros([BLOCK_ROWS], ACC)
        m_s = tl.full([BLOCK_ROWS], _NEG, ACC)
        d_s = tl.zeros([BLOCK_ROWS], ACC)

        for start in range(0, n_classes, BLOCK_C):
            c = start + cols
            mask = row_ok[:, None] & (c[None, :] < n_classes)
            s = tl.load(student_rows + c[None, :], mask=mask, other=0.0).to(ACC)
            if USE_KL:
                t = tl.load(teacher_rows + c[None, :], mask=mask, other=0.0).to(ACC)
                st = tl.where(mask, s * inv_t, _NEG)
                tt = tl.where(mask, t * inv_t, _NEG)
                m_new = tl.maximum(m_st, tl.max(st, axis=1))
                d_st = d_st * tl.exp(m_st - m_new) + tl.sum(tl.exp(st - m_new[:, None]), axis=1)
                m_st = m_new
                m_new = tl.maximum(m_tt, tl.max(tt, axis=1))
                rescale = tl.exp(m_tt - m_new)
                e_t = tl.exp(tt - m_new[:, None])
                d_tt = d_tt * rescale + tl.sum(e_t, axis=1)
                # masked lanes: e_t == 0 and tt - st == 0, so they add nothing
                cross = cross * rescale + tl.sum(e_t * (tt - st), axis=1)
                m_tt = m_new
            if HAS_LABELS:
                sm = tl.where(mask, s, _NEG)
                m_new = tl.maximum(m_s, tl.max(sm, axis=1))
                d_s = d_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(sm - m_new[:, None]), axis=1)
                m_s = m_new

        loss = tl.zeros([BLOCK_ROWS], ACC)
        # rows past the end have sums of 0 (log would warn): give them 1, they are never stored
        if USE_KL:
            lse_st = m_st + tl.log(tl.where(row_ok, d_st, 1.0))
            lse_tt = m_tt + tl.log(tl.where(row_ok, d_tt, 1.0))
            kl = cross / tl.where(row_ok, d_tt, 1.0) - lse_tt + lse_st
            loss += kd_weight * temp * temp * kl
        if HAS_LABELS:
            lse_s = m_s + tl.log(tl.where(row_ok, d_s, 1.0))
            y = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
            y_ok = row_ok & (y != ignore_index)
            s_y = tl.load(student_ptr + rows64 * stride_student + y, mask=y_ok, other=0.0).to(ACC)
            loss += ce_weight * tl.where(y_ok, lse_s - s_y, 0.0)
        tl.store(loss_ptr + rows, loss, mask=row_ok)

        if COMPUTE_GRAD:
            grad_rows = grad_ptr + rows64[:, None] * stride_grad
            # the reduction's scale (1/N for "mean") is folded in, so backward need not touch the gradient
            gscale = tl.cast(grad_scale, ACC) + tl.cast(grad_scale_lo, ACC)
            kd_grad_weight = kd_weight * temp * gscale
            ce_grad_weight = ce_weight * gscale
            for start in range(0, n_classes, BLOCK_C):
                c = start + cols
                mask = row_ok[:, None] & (c[None, :] < n_classes)
                s = tl.load(student_rows + c[None, :], mask=mask, other=0.0).to(ACC)
                g = tl.zeros([BLOCK_ROWS, BLOCK_C], ACC)
                if USE_KL:
                    t = tl.load(teacher_rows + c[None, :], mask=mask, other=0.0).to(ACC)
                    p_s = tl.exp(tl.where(mask, s * inv_t, _NEG) - lse_st[:, None])
                    p_t = tl.exp(tl.where(mask, t * inv_t, _NEG) - lse_tt[:, None])
                    g += kd_grad_weight * (p_s - p_t)
                if HAS_LABELS:
                    p = tl.exp(tl.where(mask, s, _NEG) - lse_s[:, None])
                    hit = c[None, :] == y[:, None]
                    g += tl.where(y_ok[:, None], ce_grad_weight * (p - tl.where(hit, 1.0, 0.0)), 0.0)
                tl.store(grad_rows + c[None, :], g.to(grad_ptr.dtype.element_ty), mask=mask)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _prev_pow2(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def _float32_pair(value: float) -> tuple[float, float]:
    """(hi, lo), both exact in float32, with hi + lo == value to about 48 bits."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, struct.unpack("f", struct.pack("f", value - hi))[0]


def _launch_config(n_rows: int, n_classes: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_C, num_warps) for an ``n_rows x n_classes`` problem."""
    block_c = min(_next_pow2(n_classes), MAX_BLOCK_C)
    if device.type == "cuda":
        block_rows = max(1, _TILE_ELEMS_GPU // block_c)
        # keep at least a few programs per SM, otherwise narrow rows leave most of the GPU idle
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        block_rows = min(block_rows, _prev_pow2(max(1, n_rows // (4 * sms))))
        num_warps = max(1, min(8, block_rows * block_c // 512))
    else:
        block_rows = max(1, _TILE_ELEMS_INTERPRETER // block_c)
        num_warps = 4
    block_rows = min(block_rows, _next_pow2(n_rows))
    return block_rows, block_c, num_warps


def _forward_triton(student, teacher, labels, temperature, alpha, ignore_index, compute_grad, grad_scale):
    n_rows, n_classes = student.shape
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    per_row = torch.empty(n_rows, dtype=acc, device=student.device)
    grad = torch.empty((n_rows, n_classes), dtype=student.dtype, device=student.device) if compute_grad else None
    if _POISON_OUTPUTS:
        per_row.fill_(float("nan"))
        if grad is not None:
            grad.fill_(float("nan"))
    block_rows, block_c, num_warps = _launch_config(n_rows, n_classes, student.device)
    use_kl = alpha > 0.0
    has_labels = labels is not None and alpha < 1.0
    grid = (triton.cdiv(n_rows, block_rows),)
    _kd_loss_kernel[grid](
        student, teacher, labels if has_labels else student, per_row, grad if compute_grad else per_row,
        n_rows, n_classes, student.stride(0), teacher.stride(0), grad.stride(0) if compute_grad else 0,
        *_float32_pair(temperature), *_float32_pair(alpha), *_float32_pair(grad_scale), int(ignore_index),
        USE_KL=use_kl, HAS_LABELS=has_labels, COMPUTE_GRAD=compute_grad,
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=num_warps,
    )
    return per_row, grad


def _forward_torch(student, teacher, labels, temperature, alpha, ignore_index, compute_grad, grad_scale):
    """The kernel's algorithm in plain torch: chunks of rows through a few reused buffers (so the
    temporaries stay cache-sized however large the batch is), one exp per element for each softmax,
    and the gradient written in the same sweep. Narrow rows are handled transposed, classes along
    dimension 0, so that every reduction over classes is an elementwise op over long vectors."""
    n_rows, n_classes = student.shape
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    device = student.device
    per_row = torch.empty(n_rows, dtype=acc, device=device)
    grad = torch.empty((n_rows, n_classes), dtype=student.dtype, device=device) if compute_grad else None
    if _POISON_OUTPUTS:
        per_row.fill_(float("nan"))
        if grad is not None:
            grad.fill_(float("nan"))
    transposed = n_classes <= _TORCH_TRANSPOSE_MAX_C
    dim = 0 if transposed else 1  # the class dimension of every chunk view below

    def rows_view(x, start, stop):
        return x[start:stop].t() if transposed else x[start:stop]

    # a quarter of the batch per chunk bounds the temporaries to a fraction of the gradient, but
    # chunks stay large enough that per-op overhead does not dominate narrow rows
    chunk = min(_TORCH_CHUNK_ELEMS // n_classes, max(-(-n_rows // 4), _TORCH_MIN_CHUNK_ELEMS // n_classes))
    chunk = max(1, min(n_rows, chunk))
    buffer_shape = (n_classes, chunk) if transposed else (chunk, n_classes)
    buffers = [torch.empty(buffer_shape, dtype=acc, device=device) for _ in range(3)]
    # the gradient is built straight in the output when that is already a plain working buffer
    grad_in_place = compute_grad and grad.dtype == acc and not transposed
    kw = dict(temperature=temperature, alpha=alpha, ignore_index=ignore_index, dim=dim, grad_scale=grad_scale)
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        part = slice(0, stop - start)
        work = [b[:, part] if transposed else b[part] for b in buffers]
        g = None
        if compute_grad:
            g = grad[start:stop] if grad_in_place else work[2]
        per_row[start:stop] = _torch_chunk(
            rows_view(student, start, stop), rows_view(teacher, start, stop),
            None if labels is None else labels[start:stop], work[0], work[1], g, **kw)
        if compute_grad and not grad_in_place:
            rows_view(grad, start, stop).copy_(g)
    return per_row, grad


def _torch_chunk(s, t, labels, buf_s, buf_t, g, *, temperature, alpha, ignore_index, dim, grad_scale):
    """Per-row losses of one chunk (classes along ``dim``); the gradient, times ``grad_scale``, goes
    into ``g`` if given."""
    acc = buf_s.dtype
    use_kl = alpha > 0.0
    has_labels = labels is not None and alpha < 1.0
    # at T == 1 the cross-entropy softmax is the KL one: reuse it
    shared_softmax = use_kl and temperature == 1.0
    inv_t = 1.0 / temperature
    kd_grad_weight = alpha * temperature * grad_scale
    ce_weight = 1.0 - alpha
    loss = torch.zeros(s.shape[1 - dim], dtype=acc, device=s.device)
    # (s - max s) / T == s/T - max(s/T) since T > 0; the mixed-dtype subtraction runs in acc
    max_s = s.amax(dim=dim, keepdim=True).to(acc)
    if use_kl:
        e_s = torch.sub(s, max_s, out=buf_s)
        e_t = torch.sub(t, t.amax(dim=dim, keepdim=True).to(acc), out=buf_t)
        if inv_t != 1.0:
            e_s.mul_(inv_t)
            e_t.mul_(inv_t)
        w_t = torch.exp(e_t, out=g) if g is not None else torch.exp(e_t)
        z_t = w_t.sum(dim=dim, keepdim=True)
        # with shifted logits, KL = (w_t . (e_t - e_s)) / z_t - log z_t + log z_s: the maxima cancel
        cross = torch.linalg.vecdot(w_t, e_t, dim=dim).sub_(torch.linalg.vecdot(w_t, e_s, dim=dim))
        w_s = e_s.exp_()
        z_s = w_s.sum(dim=dim, keepdim=True)
        kl = cross.div_(z_t.squeeze(dim)).sub_(z_t.squeeze(dim).log()).add_(z_s.squeeze(dim).log())
        loss.add_(kl, alpha=alpha * temperature * temperature)
        if g is not None:
            g.mul_(-kd_grad_weight / z_t)
    elif g is not None:
        g.zero_()
    if has_labels:
        y = labels.long()
        keep = y != ignore_index
        safe_y = torch.where(keep, y, 0).unsqueeze(dim)
        if shared_softmax:
            w, z = w_s, z_s
        else:
            w = torch.sub(s, max_s, out=buf_t).exp_()
            z = w.sum(dim=dim, keepdim=True)
        s_y = s.gather(dim, safe_y).to(acc)
        loss.add_((z.log() + max_s - s_y).squeeze(dim).mul_(keep), alpha=ce_weight)
        if g is not None:
            ce_scale = keep.to(acc).mul_(ce_weight * grad_scale).unsqueeze(dim)
            if shared_softmax:  # one sweep for both terms: p_s * (alpha*T + (1-alpha)*keep)
                g.addcmul_(w, (ce_scale + kd_grad_weight) / z)
            else:
                g.addcmul_(w, ce_scale / z)
            g.scatter_add_(dim, safe_y, ce_scale.neg())
    if g is not None and use_kl and not (has_labels and shared_softmax):
        g.addcmul_(w_s, kd_grad_weight / z_s)
    return loss


class _KDLossFunction(torch.autograd.Function):
    """Returns ``(loss, per_row)``; the gradient of ``loss`` is computed in forward and kept.

    The reduction happens here so that its scale is folded into the stored gradient: for "mean" and
    "sum", backward with an incoming gradient of 1 (the usual ``loss.backward()``) hands the stored
    gradient over without touching it, one host sync instead of a read and write of ``[N, C]``.
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, temperature, alpha, ignore_index, triton_path, reduction):
        compute_grad = ctx.needs_input_grad[0]
        n_rows = student.shape[0]
        grad_scale = 1.0 / n_rows if reduction == "mean" else 1.0
        forward = _forward_triton if triton_path else _forward_torch
        per_row, grad = forward(student, teacher, labels, temperature, alpha, ignore_index, compute_grad, grad_scale)
        ctx.reduction = reduction
        if compute_grad:
            ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(per_row)
        if reduction == "none":
            loss = per_row.clone()
        else:
            loss = per_row.sum() / (n_rows if reduction == "mean" else 1)
        return loss, per_row

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_row):
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            grad = grad * grad_loss.to(grad.dtype).unsqueeze(1)
        elif not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            # out of place: backward may run more than once on a retained graph
            grad = grad * grad_loss.to(grad.dtype)
        return grad, None, None, None, None, None, None, None


def _check(student_logits, teacher_logits, labels, temperature, alpha, ignore_index, reduction):
    _checks.tensor("student_logits", student_logits, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("teacher_logits", teacher_logits, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    _checks.same_dtype("student_logits", student_logits, "teacher_logits", teacher_logits)
    _checks.same_device("student_logits", student_logits, "teacher_logits", teacher_logits)
    _checks.non_empty("student_logits", student_logits, 0)
    n_rows, n_classes = student_logits.shape
    if n_classes < 1:
        raise ValueError(f"student_logits must have at least 1 class (dimension 1), got shape {tuple(student_logits.shape)}")
    temperature = _checks.in_range("temperature", temperature, 0.0, float("inf"), lo_open=True, hi_open=True)
    alpha = _checks.in_range("alpha", alpha, 0.0, 1.0)
    _checks.choice("reduction", reduction, REDUCTIONS)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise ValueError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must have an integer dtype, got {str(labels.dtype).replace('torch.', '')}")
        if labels.shape != (n_rows,):
            raise ValueError(f"labels must have shape ({n_rows},) to match student_logits, got {tuple(labels.shape)}")
        _checks.same_device("labels", labels, "student_logits", student_logits)
    # both data checks in one device round trip
    teacher_sum = teacher_logits.detach().sum(dtype=torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32)
    flags = [torch.isfinite(teacher_sum)]
    if labels is not None:
        flags.append(((labels >= 0) & (labels < n_classes) | (labels == ignore_index)).all())
    flags = torch.stack(flags).tolist()
    # a finite sum proves every value finite; a non-finite one may also be an overflow, so look closer
    if not flags[0]:
        _checks.finite("teacher_logits", teacher_logits.detach())
    if labels is not None and not flags[1]:
        bad = labels[~((labels >= 0) & (labels < n_classes) | (labels == ignore_index))]
        raise ValueError(
            f"labels must lie in [0, {n_classes}) or equal ignore_index={ignore_index}; "
            f"found {bad.numel()} out of range, e.g. {int(bad[0])}"
        )
    return temperature, alpha


def kd_loss(student_logits, teacher_logits, labels=None, *, temperature=1.0, alpha=1.0, ignore_index=-100,
            reduction="mean", return_per_example=False):
    """Knowledge-distillation loss ``alpha*T^2*KL(softmax(t/T) || softmax(s/T)) + (1-alpha)*CE(s, y)``.

    Args:
        student_logits: ``[N, C]`` float32, bfloat16, float16 or float64 logits; the gradient flows here.
        teacher_logits: ``[N, C]`` logits of the same dtype and device, all finite. A target: treated
            as detached even if it requires grad.
        labels: optional ``[N]`` integer class ids in ``[0, C)`` or ``ignore_index``; ``None`` (or an
            ignored row) contributes no cross-entropy.
        temperature: ``T > 0``; the KL term is scaled by ``T^2`` so its gradient does not shrink with T.
        alpha: weight of the KL term in ``[0, 1]``; ``1 - alpha`` weighs the (untempered) cross-entropy.
        reduction: ``"mean"`` over all N rows (ignored rows count in the denominator), ``"sum"`` or
            ``"none"`` (the differentiable ``[N]`` vector).
        return_per_example: also return the detached float32 ``[N]`` vector of per-row losses.

    Returns the loss (float32; float64 for float64 inputs), or ``(loss, per_example)``.
    Runs the fused Triton kernel on CUDA (or under ``TRITON_INTERPRET=1``), a chunked plain-torch
    implementation otherwise.
    """
    temperature, alpha = _check(student_logits, teacher_logits, labels, temperature, alpha, ignore_index, reduction)
    student = student_logits if student_logits.stride(1) == 1 else student_logits.contiguous()
    teacher = teacher_logits.detach()
    teacher = teacher if teacher.stride(1) == 1 else teacher.contiguous()
    if labels is not None and not labels.is_contiguous():
        labels = labels.contiguous()
    triton_path = use_triton(student.device)
    loss, per_row = _KDLossFunction.apply(student, teacher, labels, temperature, alpha, ignore_index, triton_path,
                                          reduction)
    if not return_per_example:
        return loss
    return loss, per_row.detach().float()


def kd_loss_reference(student_logits, teacher_logits, labels=None, *, temperature=1.0, alpha=1.0, ignore_index=-100,
                      reduction="mean", return_per_example=False):
    """The same loss as a plain composition of torch ops (at least float32; float64 stays float64)."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.to(dtype)
    t = teacher_logits.detach().to(dtype)
    log_ps = torch.log_softmax(s / temperature, dim=1)
    log_pt = torch.log_softmax(t / temperature, dim=1)
    per_row = alpha * temperature**2 * (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)
    if labels is not None:
        ce = torch.nn.functional.cross_entropy(s, labels, ignore_index=ignore_index, reduction="none")
        per_row = per_row + (1.0 - alpha) * ce
    if reduction == "mean":
        loss = per_row.mean()
    elif reduction == "sum":
        loss = per_row.sum()
    else:
        loss = per_row
    if not return_per_example:
        return loss
    return loss, per_row.detach().float()
