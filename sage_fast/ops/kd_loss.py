"""Fused distillation loss: a divergence from the teacher plus cross-entropy to the labels.

For row ``i`` (a classifier's example, or one token of a language model: logits of any leading shape
``[..., V]`` are rows of V classes) with student logits ``s``, teacher logits ``t``, label ``y``,
temperature ``T`` and weight ``alpha``, with p = softmax(t/T) and q = softmax(s/T)::

    l_i = alpha * w * D(p, q) + (1 - alpha) * CE(s, y),       w = T^2 (Hinton's scaling) or 1

    forward KL   D = KL(p || q) = sum_j p_j log(p_j / q_j)
    reverse KL   D = KL(q || p) = sum_j q_j log(q_j / p_j)
    JSD          D = beta KL(p || m) + (1 - beta) KL(q || m),   m = beta p + (1 - beta) q

The JSD is TRL's generalized JSD (GKD) and Liger's, and as there it is forward KL at ``beta == 0``
and reverse KL at ``beta == 1``. Rows labelled ``ignore_index`` count in no term and not in the
mean (loss 0, gradient 0); rows labelled ``soft_label_index`` keep D and count in the mean, without
CE. Everything is computed from max-shifted logits ``u = t - max t`` and ``v = s - max s``, so no two
large numbers ever cancel (logits of 1e4 keep a float32 loss accurate to ~1e-6, not ~1e-3)::

    Z_t = sum_j exp(u_j/T),  Z_s = sum_j exp(v_j/T),  log p_j = u_j/T - log Z_t,  log q_j = v_j/T - log Z_s
    KL(p || q) = sum_j exp(u_j/T) (u_j - v_j) / (T Z_t)  +  log(Z_s / Z_t)
    KL(q || p) = sum_j exp(v_j/T) (v_j - u_j) / (T Z_s)  +  log(Z_t / Z_s)
    JSD: with x_j = log(beta p_j) and y_j = log((1 - beta) q_j), log m_j = max(x, y) + log(1 + exp(-|x - y|))
         (in logs, so a class where p and q both underflow keeps a finite log m), and
         KL(p || m) = sum_j p_j (x_j - log m_j) - log beta, KL(q || m) likewise
    CE = log sum_j exp(v_j)  -  v_y          (0 for ignored and soft-label rows, or without labels)

(the maxima cancel exactly between the terms of each KL). CE uses the untempered student logits.
The gradient of ``D`` with respect to the student's logits::

    forward KL   (q_j - p_j) / T
    reverse KL   q_j (log q_j - log p_j - KL(q || p)) / T
    JSD          (1 - beta) q_j (log(q_j / m_j) - KL(q || m)) / T

(for the JSD, the terms of d m / d s cancel against those of d log m: only the student's own KL
moves), and that of CE is ``softmax(s)_j - [j == y]``; ``l_i``'s is their sum with the weights
``alpha * w`` and ``1 - alpha``.

The kernel reads each input once: a row that fits one tile is loaded, reduced and turned into its
gradient from registers; a wider row streams tile by tile (running maxima and sums, rescaled when a
maximum grows; reverse KL's cross term is one more running sum) and is read a second time for the
gradient, from L2 while the working set fits. A streamed JSD row takes one more pass: its log m
terms need the row's final maxima and sums. The gradient is written once, in the student's dtype,
with the reduction's scale folded in, so backward has nothing to do for the usual
``loss.backward()``. Per element of forward KL: one exp2 for each softmax (two at T == 1 or T == 2,
where the untempered one is the tempered one, or its square) with the constants folded into one
multiply, no masks on full tiles, and the ``-[j == y]`` term written afterwards as one element per
row instead of a comparison per element; reverse KL adds a multiply-add, JSD an exp and a log. When
nothing needs a gradient (evaluation, error-profile refresh) nothing is written but the losses.

On CUDA nothing synchronises with the host: the mean's denominator (the rows that count) is counted
on the device, and the kernel reads the reduction's scale (that count, or ``num_items_in_batch``)
through a pointer; value checks (finite teacher, labels in range) run on CPU tensors and, on CUDA,
only when asked (``sage_fast.check_values``); an out-of-range label the kernel meets makes that
row's loss NaN instead of reading out of bounds. Backward scales the stored gradient in place by a
kernel that does nothing when the incoming gradient is 1, decided on the device.

The op is a ``torch.library`` custom op (``sage_fast::kd_loss``), so ``torch.compile`` takes it as one
node, Triton path included. Its gradient is a constant to autograd: a second derivative raises and
names ``kd_loss_reference``, the plain composition, as the one to use. The teacher is a target: no
gradient flows to ``teacher_logits`` even if it requires one.
"""
from __future__ import annotations

import functools
import math
import struct
from typing import Optional

import torch

from .. import _checks
from .._backend import use_triton

__all__ = ["kd_loss", "kd_loss_reference"]

REDUCTIONS = ("mean", "sum", "none")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")

# Largest class tile. Rows up to this wide are read once; wider rows stream tile by tile.
MAX_BLOCK_C = 16384
# The interpreter's tile limits: its cost grows with the programs it runs, so tiles are large, but
# rows wider than 4096 still stream, so that path is exercised where CI runs.
_MAX_BLOCK_C_INTERPRETER = 4096
_TILE_ELEMS_INTERPRETER = 16384
# Rows of the plain-torch path are processed in chunks of about this many elements, so that the
# temporaries stay small (and in cache) instead of growing with the batch.
_TORCH_CHUNK_ELEMS = 1 << 18
_TORCH_MIN_CHUNK_ELEMS = 1 << 14
# Rows this narrow go through the plain-torch path transposed (classes along dimension 0).
_TORCH_TRANSPOSE_MAX_C = 16

try:  # triton is optional at import time: without it every tensor takes the plain-torch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

if triton is not None:
    try:  # fast_logf (lg2.approx): 2 instructions instead of ~20; absent from the interpreter
        from triton.language.extra import libdevice
    except ImportError:  # pragma: no cover - very old triton
        libdevice = None

    # stands in for -inf on masked lanes (exp2 of it is exactly 0, and differences of it stay
    # finite, so 0 * difference is 0, never NaN); a constexpr, as compiled kernels may only read
    # constexpr globals
    _NEG = tl.constexpr(-1.0e30)
    _LOG2E = tl.constexpr(1.4426950408889634)
    # NaN is made in the kernel (inf - inf): a NaN global never equals itself, which Triton's
    # check that a global kept its value across kernels would refuse
    _INF = tl.constexpr(float("inf"))

    @triton.jit
    def _log(x, FAST_MATH: tl.constexpr):
        # of sums >= 1: lg2.approx's absolute error (~1e-7) is below float32's rounding of the loss
        if FAST_MATH:
            return libdevice.fast_logf(x)
        else:
            return tl.log(x)

    @triton.jit
    def _rcp(x, FAST_MATH: tl.constexpr):
        # of sums >= 1: no range fix-ups needed, so rcp.approx and a multiply do
        if FAST_MATH:
            return libdevice.fast_dividef(1.0, x)
        else:
            return 1.0 / x

    @triton.jit
    def _load_tile(base, c, row_ok, n_classes, ACC: tl.constexpr, EVEN_ROWS: tl.constexpr, EVEN_C: tl.constexpr):
        """A [rows, classes] tile in ACC; lanes past the row end hold _NEG. Masks only where needed:
        a row mask is constant along a row, so it keeps the loads vectorised."""
        ptrs = base[:, None] + c[None, :]
        if EVEN_C:
            if EVEN_ROWS:
                x = tl.load(ptrs).to(ACC)
            else:
                x = tl.load(ptrs, mask=row_ok[:, None], other=0.0).to(ACC)
        else:
            col_ok = c[None, :] < n_classes
            # other=0 then a select: an other of -1e30 would be -inf in float16, and -inf - -inf is NaN
            x = tl.load(ptrs, mask=row_ok[:, None] & col_ok, other=0.0).to(ACC)
            x = tl.where(col_ok, x, _NEG)
        return x

    @triton.jit
    def _load_flat(ptr, row0, n_rows, ACC: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                   EVEN_ROWS: tl.constexpr):
        """Contiguous rows narrower than 16 bytes (2 classes, say) as one flat run, so that each
        thread loads 16 bytes at once, then viewed as [rows, classes]."""
        offs = row0 * BLOCK_C + tl.arange(0, BLOCK_ROWS * BLOCK_C)
        if EVEN_ROWS:
            x = tl.load(ptr + offs)
        else:
            x = tl.load(ptr + offs, mask=offs < n_rows * BLOCK_C, other=0.0)
        return tl.reshape(x.to(ACC), [BLOCK_ROWS, BLOCK_C])

    @triton.jit
    def _store_tile(base, c, value, row_ok, n_classes, EVEN_ROWS: tl.constexpr, EVEN_C: tl.constexpr):
        ptrs = base[:, None] + c[None, :]
        value = value.to(base.dtype.element_ty)
        if EVEN_C:
            if EVEN_ROWS:
                tl.store(ptrs, value)
            else:
                tl.store(ptrs, value, mask=row_ok[:, None])
        else:
            tl.store(ptrs, value, mask=row_ok[:, None] & (c[None, :] < n_classes))

    @triton.jit
    def _jsd_logs(u, v, inv_t, off_p, off_q):
        """log(beta p_j / m_j) and log((1 - beta) q_j / m_j), m = beta p + (1 - beta) q, from the shifted
        logits: x = log(beta p_j) and y = log((1 - beta) q_j) (off_p, off_q hold the per-row log beta
        - log Z_t and log(1 - beta) - log Z_s), log m_j = max(x, y) + log(1 + exp(-|x - y|)). In the
        log domain, so a class where both p and q underflow still has a finite log m."""
        x = u * inv_t + off_p[:, None]
        y = v * inv_t + off_q[:, None]
        hi = tl.maximum(x, y)
        log_m = hi + tl.log(1.0 + tl.exp(tl.minimum(x, y) - hi))  # log1p is broken in the interpreter
        return x - log_m, y - log_m

    @triton.jit
    def _grad_tile(u, v, e_st, e_t, e_s, coef_st, coef_t, coef_s, row_c, off_p, off_q, inv_t,
                   USE_DIV: tl.constexpr, HAS_LABELS: tl.constexpr, TEMP_MODE: tl.constexpr, DIV: tl.constexpr):
        """The gradient of one tile, from per-row coefficients that hold 1/Z, the weights and the scale:
        forward KL  coef_st * e_st + coef_t * e_t               (T (q - p) once weighed)
        reverse KL  coef_st * e_st * (v - u - row_c)            (row_c = sum_j e_st_j (v_j - u_j) / Z_s)
        JSD         coef_st * e_st * (log((1-beta) q / m) - row_c)   (row_c = log(1 - beta) + KL(q || m))
        plus coef_s * e_s for the cross-entropy; at T == 1 the two student softmaxes are one, so forward
        KL takes one multiply-add less."""
        if USE_DIV:
            if DIV == 0:
                if HAS_LABELS and TEMP_MODE == 1:
                    g = e_st * (coef_st + coef_s)[:, None] + e_t * coef_t[:, None]
                else:
                    g = e_st * coef_st[:, None] + e_t * coef_t[:, None]
                    if HAS_LABELS:
                        g += e_s * coef_s[:, None]
            else:
                if DIV == 1:
                    g = e_st * coef_st[:, None] * (v - u - row_c[:, None])
                else:
                    _, log_qm = _jsd_logs(u, v, inv_t, off_p, off_q)
                    g = e_st * coef_st[:, None] * (log_qm - row_c[:, None])
                if HAS_LABELS:
                    g += e_s * coef_s[:, None]
        elif HAS_LABELS:
            g = e_s * coef_s[:, None]
        else:  # alpha == 0 and no labels: the loss is 0
            g = tl.zeros_like(e_s)
        return g

    @triton.jit
    def _exps(s, t, m_s, m_t, k, USE_DIV: tl.constexpr, HAS_LABELS: tl.constexpr, TEMP_MODE: tl.constexpr):
        """exp((t - m_t)/T), exp((s - m_s)/T), exp(s - m_s) and the shifted logits, as exp2 of one
        multiply each (k = log2(e)/T). At T == 2 the untempered softmax is the square of the tempered
        one: a multiply instead of an exponential."""
        v = s - m_s[:, None]
        u = v
        e_t = v
        e_st = v
        e_s = v
        if USE_DIV:
            u = t - m_t[:, None]
            e_t = tl.exp2(u * k)
            e_st = tl.exp2(v * k)
        if HAS_LABELS:
            if USE_DIV and TEMP_MODE == 1:
                e_s = e_st
            elif USE_DIV and TEMP_MODE == 2:
                e_s = e_st * e_st
            else:
                e_s = tl.exp2(v * _LOG2E)
        return u, v, e_t, e_st, e_s

    @triton.jit
    def _stream_stats(s_base, t_base, c, row_ok, n_classes, m_s, m_t, d_t, d_st, d_s, cross, k, ACC: tl.constexpr,
                      EVEN_ROWS: tl.constexpr, EVEN_C: tl.constexpr, USE_DIV: tl.constexpr, HAS_LABELS: tl.constexpr,
                      TEMP_MODE: tl.constexpr, DIV: tl.constexpr):
        """One tile of a streamed row: the running maxima grow, and the sums are rescaled to them.
        ``cross`` is sum_j e_t_j (u_j - v_j) for forward KL, sum_j e_st_j (v_j - u_j) for reverse KL,
        unused for JSD (whose log m terms need the final sums: a pass of their own)."""
        s = _load_tile(s_base, c, row_ok, n_classes, ACC, EVEN_ROWS, EVEN_C)
        m_s_new = tl.maximum(m_s, tl.max(s, axis=1))
        shift_s = m_s - m_s_new  # <= 0; about -1e30 on the first tile, where the sums are 0
        t = s
        m_t_new = m_s_new
        if USE_DIV:
            t = _load_tile(t_base, c, row_ok, n_classes, ACC, EVEN_ROWS, EVEN_C)
            m_t_new = tl.maximum(m_t, tl.max(t, axis=1))
        u, v, e_t, e_st, e_s = _exps(s, t, m_s_new, m_t_new, k, USE_DIV, HAS_LABELS, TEMP_MODE)
        if USE_DIV:
            shift_t = m_t - m_t_new
            r_t = tl.exp2(shift_t * k)
            r_st = tl.exp2(shift_s * k)
            # moving both maxima moves every earlier (u_j - v_j) by shift_t - shift_s
            if DIV == 0:
                cross = r_t * (cross + (shift_t - shift_s) * d_t) + tl.sum(e_t * (u - v), axis=1)
            elif DIV == 1:
                cross = r_st * (cross + (shift_s - shift_t) * d_st) + tl.sum(e_st * (v - u), axis=1)
            d_t = r_t * d_t + tl.sum(e_t, axis=1)
            d_st = r_st * d_st + tl.sum(e_st, axis=1)
        if HAS_LABELS:
            d_s = tl.exp2(shift_s * _LOG2E) * d_s + tl.sum(e_s, axis=1)
        return m_s_new, m_t_new, d_t, d_st, d_s, cross

    @triton.jit
    def _stream_jsd(s_base, t_base, c, row_ok, n_classes, m_s, m_t, k, inv_t, off_p, off_q, sum_p, sum_q,
                    ACC: tl.constexpr, EVEN_ROWS: tl.constexpr, EVEN_C: tl.constexpr):
        """One tile of a streamed row's JSD sums, from its final maxima and sums: sum_j e_t_j log(beta
        p_j / m_j) and sum_j e_st_j log((1 - beta) q_j / m_j) (times 1/Z_t and 1/Z_s once complete)."""
        s = _load_tile(s_base, c, row_ok, n_classes, ACC, EVEN_ROWS, EVEN_C)
        t = _load_tile(t_base, c, row_ok, n_classes, ACC, EVEN_ROWS, EVEN_C)
        u, v, e_t, e_st, _ = _exps(s, t, m_s, m_t, k, True, False, 0)
        log_pm, log_qm = _jsd_logs(u, v, inv_t, off_p, off_q)
        sum_p += tl.sum(e_t * log_pm, axis=1)
        sum_q += tl.sum(e_st * log_qm, axis=1)
        return sum_p, sum_q

    @triton.jit
    def _stream_grad(s_base, t_base, g_base, c, row_ok, n_classes, m_s, m_t, k, coef_st, coef_t, coef_s, row_c,
                     off_p, off_q, inv_t, ACC: tl.constexpr, EVEN_ROWS: tl.constexpr, EVEN_C: tl.constexpr,
                     USE_DIV: tl.constexpr, HAS_LABELS: tl.constexpr, TEMP_MODE: tl.constexpr, DIV: tl.constexpr):
        """One tile of a streamed row's gradient, from the row's final maxima and sums."""
        s = _load_tile(s_base, c, row_ok, n_classes, ACC, EVEN_ROWS, EVEN_C)
        t = s
        if USE_DIV:
            t = _load_tile(t_base, c, row_ok, n_classes, ACC, EVEN_ROWS, EVEN_C)
        u, v, e_t, e_st, e_s = _exps(s, t, m_s, m_t, k, USE_DIV, HAS_LABELS, TEMP_MODE)
        g = _grad_tile(u, v, e_st, e_t, e_s, coef_st, coef_t, coef_s, row_c, off_p, off_q, inv_t, USE_DIV,
                       HAS_LABELS, TEMP_MODE, DIV)
        _store_tile(g_base, c, g, row_ok, n_classes, EVEN_ROWS, EVEN_C)

    @triton.jit
    def _kd_loss_kernel(
        student_ptr, teacher_ptr, labels_ptr, loss_ptr, grad_ptr, scale_ptr,
        n_rows, n_classes_v, stride_student_v, stride_teacher_v, stride_grad_v, rows_bucket,
        temperature, temperature_lo, div_weight, div_weight_lo, ce_weight, ce_weight_lo, beta, beta_lo,
        ignore_index, soft_label_index,
        USE_DIV: tl.constexpr, DIV: tl.constexpr, HAS_LABELS: tl.constexpr, MASK_ROWS: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr, TEMP_MODE: tl.constexpr,
        ACC: tl.constexpr, VEC: tl.constexpr, CONTIGUOUS: tl.constexpr, FAST_MATH: tl.constexpr,
        BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE_TILE: tl.constexpr, EVEN_C: tl.constexpr,
    ):
        # every program but the last has all its rows: it runs a copy of the code without row masks
        # (a mask that is not constant over 16 bytes, as on flat runs of narrow rows, narrows the access)
        if BLOCK_ROWS == 1:
            _kd_loss_rows(
                student_ptr, teacher_ptr, labels_ptr, loss_ptr, grad_ptr, scale_ptr, n_rows, n_classes_v,
                stride_student_v, stride_teacher_v, stride_grad_v, temperature, temperature_lo, div_weight,
                div_weight_lo, ce_weight, ce_weight_lo, beta, beta_lo, ignore_index, soft_label_index, USE_DIV, DIV,
                HAS_LABELS, MASK_ROWS, COMPUTE_GRAD, TEMP_MODE, ACC, VEC, CONTIGUOUS, FAST_MATH, BLOCK_ROWS, BLOCK_C,
                SINGLE_TILE, True, EVEN_C)
        elif (tl.program_id(0) + 1) * BLOCK_ROWS <= n_rows:
            _kd_loss_rows(
                student_ptr, teacher_ptr, labels_ptr, loss_ptr, grad_ptr, scale_ptr, n_rows, n_classes_v,
                stride_student_v, stride_teacher_v, stride_grad_v, temperature, temperature_lo, div_weight,
                div_weight_lo, ce_weight, ce_weight_lo, beta, beta_lo, ignore_index, soft_label_index, USE_DIV, DIV,
                HAS_LABELS, MASK_ROWS, COMPUTE_GRAD, TEMP_MODE, ACC, VEC, CONTIGUOUS, FAST_MATH, BLOCK_ROWS, BLOCK_C,
                SINGLE_TILE, True, EVEN_C)
        else:
            _kd_loss_rows(
                student_ptr, teacher_ptr, labels_ptr, loss_ptr, grad_ptr, scale_ptr, n_rows, n_classes_v,
                stride_student_v, stride_teacher_v, stride_grad_v, temperature, temperature_lo, div_weight,
                div_weight_lo, ce_weight, ce_weight_lo, beta, beta_lo, ignore_index, soft_label_index, USE_DIV, DIV,
                HAS_LABELS, MASK_ROWS, COMPUTE_GRAD, TEMP_MODE, ACC, VEC, CONTIGUOUS, FAST_MATH, BLOCK_ROWS, BLOCK_C,
                SINGLE_TILE, False, EVEN_C)

    @triton.jit
    def _kd_loss_rows(
        student_ptr, teacher_ptr, labels_ptr, loss_ptr, grad_ptr, scale_ptr,
        n_rows, n_classes_v, stride_student_v, stride_teacher_v, stride_grad_v,
        temperature, temperature_lo, div_weight, div_weight_lo, ce_weight, ce_weight_lo, beta, beta_lo,
        ignore_index, soft_label_index,
        USE_DIV: tl.constexpr, DIV: tl.constexpr, HAS_LABELS: tl.constexpr, MASK_ROWS: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr, TEMP_MODE: tl.constexpr,
        ACC: tl.constexpr, VEC: tl.constexpr, CONTIGUOUS: tl.constexpr, FAST_MATH: tl.constexpr,
        BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
        SINGLE_TILE: tl.constexpr, EVEN_ROWS: tl.constexpr, EVEN_C: tl.constexpr,
    ):
        """One program's rows: the whole op. EVEN_ROWS: every row exists (no row masks). USE_DIV: the
        divergence term is on (alpha > 0), DIV picks it (0 forward KL, 1 reverse KL, 2 JSD). HAS_LABELS:
        the cross-entropy term is on. MASK_ROWS: rows labelled ignore_index count in no term."""
        # the class count and row strides arrive divided by VEC: multiplied back here, Triton knows
        # they are multiples of VEC, so rows start aligned and loads and stores vectorise
        n_classes = n_classes_v * VEC
        pid = tl.program_id(0)
        rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        s_base = student_ptr + rows64 * (stride_student_v * VEC)
        t_base = teacher_ptr + rows64 * (stride_teacher_v * VEC)
        # rows narrower than 16 bytes, stored back to back: read and written as one flat run
        FLAT: tl.constexpr = SINGLE_TILE and EVEN_C and CONTIGUOUS and BLOCK_C <= 4
        # narrow rows find the label's logit and write its -1 inside the tile (a compare per element
        # is cheaper than a gather per row); wide rows gather it and rewrite one element per row
        LABEL_IN_TILE: tl.constexpr = SINGLE_TILE and BLOCK_C <= 32
        row0 = pid.to(tl.int64) * BLOCK_ROWS

        # scalars arrive as float32 pairs (value, remainder) so float64 inputs keep float64 precision
        temp = tl.cast(temperature, ACC) + tl.cast(temperature_lo, ACC)
        inv_t = 1.0 / temp
        k = _LOG2E * inv_t  # exp(x / T) == exp2(x * k)
        # alpha (times T^2 when so scaled) and 1 - alpha
        kd_weight = tl.cast(div_weight, ACC) + tl.cast(div_weight_lo, ACC)
        ce_w = tl.cast(ce_weight, ACC) + tl.cast(ce_weight_lo, ACC)

        # per row: maxima m_s, m_t; sums Z_t (d_t), Z_s at T (d_st) and at 1 (d_s); cross as in
        # _stream_stats, u and v shifted by the current maxima
        if SINGLE_TILE:
            if FLAT:
                s = _load_flat(student_ptr, row0, n_rows, ACC, BLOCK_ROWS, BLOCK_C, EVEN_ROWS)
            else:
                s = _load_tile(s_base, cols, row_ok, n_classes, ACC, EVEN_ROWS, EVEN_C)
            m_s = tl.max(s, axis=1)
            t = s
            m_t = m_s
            if USE_DIV:
                if FLAT:
                    t = _load_flat(teacher_ptr, row0, n_rows, ACC, BLOCK_ROWS, BLOCK_C, EVEN_ROWS)
                else:
                    t = _load_tile(t_base, cols, row_ok, n_classes, ACC, EVEN_ROWS, EVEN_C)
                m_t = tl.max(t, axis=1)
            u, v, e_t, e_st, e_s = _exps(s, t, m_s, m_t, k, USE_DIV, HAS_LABELS, TEMP_MODE)
            d_t = tl.sum(e_t, axis=1)
            d_st = tl.sum(e_st, axis=1)
            d_s = tl.sum(e_s, axis=1)
            if DIV == 1:
                cross = tl.sum(e_st * (v - u), axis=1)
            else:
                cross = tl.sum(e_t * (u - v), axis=1)
        else:
            m_s = tl.full([BLOCK_ROWS], _NEG, ACC)
            m_t = tl.full([BLOCK_ROWS], _NEG, ACC)
            d_t = tl.zeros([BLOCK_ROWS], ACC)
            d_st = tl.zeros([BLOCK_ROWS], ACC)
            d_s = tl.zeros([BLOCK_ROWS], ACC)
            cross = tl.zeros([BLOCK_ROWS], ACC)
            # full tiles without column masks, then the partial one
            n_full = (n_classes // BLOCK_C) * BLOCK_C
            for start in range(0, n_full, BLOCK_C):
                m_s, m_t, d_t, d_st, d_s, cross = _stream_stats(
                    s_base, t_base, start + cols, row_ok, n_classes, m_s, m_t, d_t, d_st, d_s, cross, k,
                    ACC, EVEN_ROWS, True, USE_DIV, HAS_LABELS, TEMP_MODE, DIV)
            if not EVEN_C:
                m_s, m_t, d_t, d_st, d_s, cross = _stream_stats(
                    s_base, t_base, n_full + cols, row_ok, n_classes, m_s, m_t, d_t, d_st, d_s, cross, k,
                    ACC, EVEN_ROWS, False, USE_DIV, HAS_LABELS, TEMP_MODE, DIV)

        # every sum is >= 1 (the maximum contributes exp(0)), also on rows past the end
        loss = tl.zeros([BLOCK_ROWS], ACC)
        r_t = _rcp(d_t, FAST_MATH)
        r_st = _rcp(d_st, FAST_MATH)
        # the per-row constant of the divergence's gradient (see _grad_tile), and JSD's log offsets
        row_c = r_t
        off_p = r_t
        off_q = r_t
        if USE_DIV:
            if DIV == 0:
                # log Z_s - log Z_t as one log of the ratio: one logarithm less, and no cancellation
                div = cross * inv_t * r_t + _log(d_st * r_t, FAST_MATH)
            elif DIV == 1:
                row_c = cross * r_st
                div = row_c * inv_t + _log(d_t * r_st, FAST_MATH)
            else:
                beta_v = tl.cast(beta, ACC) + tl.cast(beta_lo, ACC)
                log_beta = tl.log(beta_v)
                log_1m_beta = tl.log(1.0 - beta_v)
                off_p = log_beta - _log(d_t, FAST_MATH)
                off_q = log_1m_beta - _log(d_st, FAST_MATH)
                sum_p = tl.zeros([BLOCK_ROWS], ACC)
                sum_q = tl.zeros([BLOCK_ROWS], ACC)
                if SINGLE_TILE:
                    log_pm, log_qm = _jsd_logs(u, v, inv_t, off_p, off_q)
                    sum_p = tl.sum(e_t * log_pm, axis=1)
                    sum_q = tl.sum(e_st * log_qm, axis=1)
                else:
                    # the log m terms need the final maxima and sums: one more pass over the row
                    for start in range(0, n_full, BLOCK_C):
                        sum_p, sum_q = _stream_jsd(s_base, t_base, start + cols, row_ok, n_classes, m_s, m_t, k,
                                                   inv_t, off_p, off_q, sum_p, sum_q, ACC, EVEN_ROWS, True)
                    if not EVEN_C:
                        sum_p, sum_q = _stream_jsd(s_base, t_base, n_full + cols, row_ok, n_classes, m_s, m_t, k,
                                                   inv_t, off_p, off_q, sum_p, sum_q, ACC, EVEN_ROWS, False)
                # KL(p || m) = sum p log(beta p / m) - log beta, and likewise for q
                kl_qm = sum_q * r_st - log_1m_beta
                div = beta_v * (sum_p * r_t - log_beta) + (1.0 - beta_v) * kl_qm
                row_c = log_1m_beta + kl_qm
            loss += kd_weight * div
        y_ok = row_ok
        y_safe = rows
        counted = row_ok
        hit = cols[None, :] < 0
        if HAS_LABELS or MASK_ROWS:
            if EVEN_ROWS:
                y = tl.load(labels_ptr + rows).to(tl.int64)
            else:
                y = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
            if MASK_ROWS:
                counted = row_ok & (y != ignore_index)
        if HAS_LABELS:
            labelled = counted & (y != ignore_index) & (y != soft_label_index)
            in_range = y.to(tl.uint64) < n_classes.to(tl.uint64)  # 0 <= y < C in one comparison
            y_ok = labelled & in_range
            if LABEL_IN_TILE:
                # 32-bit compares per element: y is known to be in [0, C) where it counts
                hit = cols[None, :] == tl.where(y_ok, y, -1).to(tl.int32)[:, None]
                v_y = tl.sum(tl.where(hit, v, 0.0), axis=1)
            else:
                y_safe = tl.where(y_ok, y, 0)
                v_y = tl.load(s_base + y_safe, mask=y_ok, other=0.0).to(ACC) - m_s
            ce = _log(d_s, FAST_MATH) - v_y
            loss += tl.where(y_ok, ce_w * ce, 0.0)
        if MASK_ROWS:
            loss = tl.where(counted, loss, 0.0)
        if HAS_LABELS:
            # a label outside [0, C) that was not checked on the host: a NaN loss says so, instead of
            # reading memory past the row
            loss = tl.where(labelled & ~in_range, _INF - _INF, loss)
        if EVEN_ROWS:
            tl.store(loss_ptr + rows, loss)
        else:
            tl.store(loss_ptr + rows, loss, mask=row_ok)

        if COMPUTE_GRAD:
            g_base = grad_ptr + rows64 * (stride_grad_v * VEC)
            # the reduction's scale (1/count for "mean", on the device) is folded in, so backward need
            # not touch the gradient
            gscale = tl.load(scale_ptr).to(ACC)
            kd_grad_weight = kd_weight * inv_t * gscale
            if MASK_ROWS:  # an ignored row's gradient is 0
                kd_grad_weight = tl.where(counted, kd_grad_weight, 0.0)
            ce_grad_weight = ce_w * gscale
            if DIV == 0:
                coef_st = kd_grad_weight * r_st
            elif DIV == 1:
                coef_st = kd_grad_weight * inv_t * r_st
            else:
                coef_st = kd_grad_weight * (1.0 - beta_v) * r_st
            coef_t = -kd_grad_weight * r_t
            coef_s = coef_t
            if HAS_LABELS:
                coef_s = tl.where(y_ok, ce_grad_weight * _rcp(d_s, FAST_MATH), 0.0)
            if SINGLE_TILE:
                g = _grad_tile(u, v, e_st, e_t, e_s, coef_st, coef_t, coef_s, row_c, off_p, off_q, inv_t, USE_DIV,
                               HAS_LABELS, TEMP_MODE, DIV)
                if HAS_LABELS and LABEL_IN_TILE:
                    g -= tl.where(hit, ce_grad_weight, 0.0)
                if FLAT:
                    offs = row0 * BLOCK_C + tl.arange(0, BLOCK_ROWS * BLOCK_C)
                    g = tl.reshape(g, [BLOCK_ROWS * BLOCK_C]).to(grad_ptr.dtype.element_ty)
                    if EVEN_ROWS:
                        tl.store(grad_ptr + offs, g)
                    else:
                        tl.store(grad_ptr + offs, g, mask=offs < n_rows * BLOCK_C)
                else:
                    _store_tile(g_base, cols, g, row_ok, n_classes, EVEN_ROWS, EVEN_C)
            else:
                # the second read of the row, from L2 while the programs' rows fit there
                for start in range(0, n_full, BLOCK_C):
                    _stream_grad(s_base, t_base, g_base, start + cols, row_ok, n_classes, m_s, m_t, k, coef_st, coef_t,
                                 coef_s, row_c, off_p, off_q, inv_t, ACC, EVEN_ROWS, True, USE_DIV, HAS_LABELS,
                                 TEMP_MODE, DIV)
                if not EVEN_C:
                    _stream_grad(s_base, t_base, g_base, n_full + cols, row_ok, n_classes, m_s, m_t, k, coef_st,
                                 coef_t, coef_s, row_c, off_p, off_q, inv_t, ACC, EVEN_ROWS, False, USE_DIV,
                                 HAS_LABELS, TEMP_MODE, DIV)
            if HAS_LABELS and not LABEL_IN_TILE:
                # the label's -1: one element per row, rewritten once every thread's tile store is
                # visible (a barrier), instead of a comparison with y at every element
                tl.debug_barrier()
                # rows without a label are not stored; keep their exponents at 0 all the same
                v_y1 = tl.where(y_ok, v_y, 0.0)[:, None]
                t_y1 = v_y1
                if USE_DIV:
                    t_y = tl.load(t_base + y_safe, mask=y_ok, other=0.0).to(ACC)
                    t_y1 = tl.where(y_ok, t_y, m_t)[:, None]
                u_y, v_y2, e_t_y, e_st_y, e_s_y = _exps(v_y1, t_y1, m_s * 0.0, m_t, k, USE_DIV, HAS_LABELS, TEMP_MODE)
                g_y = tl.sum(_grad_tile(u_y, v_y2, e_st_y, e_t_y, e_s_y, coef_st, coef_t, coef_s, row_c, off_p, off_q,
                                        inv_t, USE_DIV, HAS_LABELS, TEMP_MODE, DIV), axis=1) - ce_grad_weight
                tl.store(g_base + y_safe, g_y.to(grad_ptr.dtype.element_ty), mask=y_ok)

    @triton.jit
    def _scale_kernel(grad_ptr, factor_ptr, n_blocks, numel, ACC: tl.constexpr, BLOCK: tl.constexpr,
                      EVEN: tl.constexpr):
        """grad *= factor in place, unless factor == 1 (the usual loss.backward()): decided here, on
        the device, so the host never waits for the value and the common case moves no bytes."""
        factor = tl.load(factor_ptr).to(ACC)
        if factor != 1.0:
            offs = tl.arange(0, BLOCK)
            for block in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
                o = tl.cast(block, tl.int64) * BLOCK + offs  # tl.cast: the interpreter gives a plain int
                if EVEN:
                    x = tl.load(grad_ptr + o).to(ACC)
                    tl.store(grad_ptr + o, (x * factor).to(grad_ptr.dtype.element_ty))
                else:
                    x = tl.load(grad_ptr + o, mask=o < numel, other=0.0).to(ACC)
                    tl.store(grad_ptr + o, (x * factor).to(grad_ptr.dtype.element_ty), mask=o < numel)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _float32_pair(value: float) -> tuple[float, float]:
    """(hi, lo), both exact in float32, with hi + lo == value to about 48 bits."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, struct.unpack("f", struct.pack("f", value - hi))[0]


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise (half inputs compute in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _vector_width(n_classes: int, *strides: int) -> int:
    """Largest power of two up to 8 dividing the class count and every row stride: the kernel gets
    them as multiples of it, which is what lets Triton emit 16-byte loads (8 half or 4 float)."""
    vec = 8
    while vec > 1 and any(x % vec for x in (n_classes, *strides)):
        vec //= 2
    return vec


#: Most rows one program takes: a batch of 65,536 rows (a typical token batch, or a large classifier
#: batch) then launches at least 256 programs, enough for one per SM on a 132-SM H100 or H200 with
#: room to balance; narrow rows in larger tiles would leave SMs idle and the launch latency-bound.
MAX_BLOCK_ROWS = 256
#: Row count and SM count the cap above is sized for (tests check the grid against them).
TYPICAL_ROWS, GPU_SMS = 65536, 132


def _rows_bucket(n_rows: int) -> int:
    """The autotuning key's row count: a power of two (at least 16, at most 65536), so that the
    last, shorter batch of an epoch does not tune again, but 32 rows and 64k rows are told apart."""
    return max(16, min(_next_pow2(n_rows), 1 << 16))


def _gpu_configs(n_classes: int, elem_bytes: int, max_block_c: int) -> tuple[tuple[int, int, int], ...]:
    """(BLOCK_ROWS, BLOCK_C, num_warps) candidates for rows of ``n_classes``: whole rows in one tile
    (several rows per program when rows are narrow) where a row fits, and streaming tiles where a
    row is wide. Each thread holds 16 or 32 elements of a tile: several 16-byte loads in flight
    per input, per-row reductions spread over enough elements, and no spills; narrow rows take at most
    ``MAX_BLOCK_ROWS`` rows a program, with as few as 8 elements per thread and input. Few
    candidates, as each is compiled and timed on the first call for a key."""
    width = _next_pow2(n_classes)

    def warps_for(elements: int, per_thread_options=(32, 16)) -> list[int]:
        return [elements // (32 * per_thread) for per_thread in per_thread_options
                if 1 <= elements // (32 * per_thread) <= 32 and per_thread * elem_bytes >= 16]

    configs = []
    if width <= max_block_c:
        for tile in sorted({2048, 4096, 8192, width}):
            if tile >= width and tile // width <= MAX_BLOCK_ROWS:
                configs += [(tile // width, width, w) for w in warps_for(tile)]
        if width * MAX_BLOCK_ROWS < 2048:
            # Few classes: tiles of at most MAX_BLOCK_ROWS rows are small, so each thread holds fewer
            # elements (8: two 16-byte vectors per fp32 input, and for 2 classes four rows, whose four
            # per-row losses are one 16-byte store; with 4 they would be an 8-byte one).
            for rows in (MAX_BLOCK_ROWS, MAX_BLOCK_ROWS // 2):
                configs += [(rows, width, w) for w in warps_for(rows * width, (16, 8))]
    if width > 2048:
        for block_c, warps in ((2048, 4), (4096, 4), (4096, 8), (8192, 8)):
            if block_c < width and block_c <= max_block_c:
                configs.append((1, block_c, warps))
    return tuple(configs)


def _interpreter_config(n_rows: int, n_classes: int) -> tuple[int, int, int]:
    """One config (the interpreter cannot autotune over several): large tiles, as each program
    instance costs milliseconds there."""
    block_c = min(_next_pow2(n_classes), MAX_BLOCK_C, _MAX_BLOCK_C_INTERPRETER)
    block_rows = max(1, min(_TILE_ELEMS_INTERPRETER // block_c, _next_pow2(n_rows)))
    return block_rows, block_c, 4


if triton is not None:
    _kd_loss_heuristic = triton.heuristics({
        "SINGLE_TILE": lambda a: a["BLOCK_C"] >= a["n_classes_v"] * a["VEC"],
        "EVEN_C": lambda a: (a["n_classes_v"] * a["VEC"]) % a["BLOCK_C"] == 0,
    })(_kd_loss_kernel)

    @functools.lru_cache(maxsize=None)
    def _tuned_kernel(configs: tuple[tuple[int, int, int], ...]):
        """The kernel autotuned over ``configs``, one tuner per class-width family, so each tunes
        only what fits its width; the compiled variants are shared through the one jit function.
        The first call for a key benchmarks the candidates (and synchronises); later ones do not.
        Built inside the op's implementation, which torch.compile calls but never traces."""
        return triton.autotune(
            configs=[triton.Config({"BLOCK_ROWS": r, "BLOCK_C": c}, num_warps=w) for r, c, w in configs],
            key=["n_classes_v", "VEC", "rows_bucket", "USE_DIV", "DIV", "HAS_LABELS", "MASK_ROWS", "COMPUTE_GRAD",
                 "TEMP_MODE"],
        )(_kd_loss_heuristic)


# The kernel's stand-in for "no such label" where ignore_index or soft_label_index is None: no class
# id can equal it.
_NO_LABEL = -(1 << 63)


def _empty_outputs(n_rows, n_classes, acc, grad_dtype, device, compute_grad):
    """The per-row losses (in ``acc``) and, when asked, the gradient (in the student's dtype), both
    uninitialised: every element is written by the forward pass."""
    per_row = torch.empty(n_rows, dtype=acc, device=device)
    grad = torch.empty((n_rows, n_classes), dtype=grad_dtype, device=device) if compute_grad else None
    return per_row, grad


def _forward_triton(student, teacher, labels, scale, temperature, div_weight, ce_weight, divergence, beta,
                    ignore_index, soft_label_index, compute_grad):
    n_rows, n_classes = student.shape
    acc = _acc_dtype(student, teacher)
    per_row, grad = _empty_outputs(n_rows, n_classes, acc, student.dtype, student.device, compute_grad)
    use_div = div_weight > 0.0
    has_labels = labels is not None and ce_weight > 0.0
    mask_rows = labels is not None and ignore_index is not None
    ignore = _NO_LABEL if ignore_index is None else int(ignore_index)
    soft = ignore if soft_label_index is None else int(soft_label_index)
    grad_stride = grad.stride(0) if compute_grad else 0
    vec = _vector_width(n_classes, student.stride(0), teacher.stride(0), grad_stride)
    if student.device.type == "cuda":
        configs = _gpu_configs(n_classes, min(student.element_size(), teacher.element_size()), MAX_BLOCK_C)
    else:
        configs = (_interpreter_config(n_rows, n_classes),)
    _tuned_kernel(configs)[lambda meta: (triton.cdiv(n_rows, meta["BLOCK_ROWS"]),)](
        student, teacher, labels if has_labels or mask_rows else student, per_row,
        grad if compute_grad else per_row, scale,
        n_rows, n_classes // vec, student.stride(0) // vec, teacher.stride(0) // vec, grad_stride // vec,
        _rows_bucket(n_rows),
        *_float32_pair(temperature), *_float32_pair(div_weight), *_float32_pair(ce_weight), *_float32_pair(beta),
        ignore, soft,
        USE_DIV=use_div, DIV=divergence if use_div else 0, HAS_LABELS=has_labels, MASK_ROWS=mask_rows,
        COMPUTE_GRAD=compute_grad, TEMP_MODE=1 if temperature == 1.0 else 2 if temperature == 2.0 else 0,
        ACC=tl.float64 if acc == torch.float64 else tl.float32, VEC=vec,
        CONTIGUOUS=student.stride(0) == n_classes and teacher.stride(0) == n_classes,
        FAST_MATH=student.device.type == "cuda" and acc == torch.float32 and libdevice is not None,
    )
    return per_row, grad


def _scale_in_place_triton(grad: torch.Tensor, factor: torch.Tensor) -> None:
    numel = grad.numel()
    block = 4096 if grad.device.type == "cuda" else _TILE_ELEMS_INTERPRETER
    n_blocks = triton.cdiv(numel, block)
    if grad.device.type == "cuda":
        # a few programs per SM, each striding over blocks: when factor == 1 they read one scalar and stop
        programs = min(n_blocks, 4 * torch.cuda.get_device_properties(grad.device).multi_processor_count)
    else:
        programs = min(n_blocks, 4)
    _scale_kernel[(programs,)](grad, factor, n_blocks, numel,
                               ACC=tl.float64 if _acc_dtype(grad, factor) == torch.float64 else tl.float32,
                               BLOCK=block, EVEN=numel % block == 0, num_warps=8)


def _keep_graph() -> bool:
    """Whether the running backward keeps its graph (retain_graph or create_graph): then backward
    may run again and the stored gradient must stay as it is. Unknown: assume so. It is unknown on an
    older torch, and while torch.compile traces backward: the traced code serves every later
    backward, kept graphs included (and the private getter would split the graph)."""
    if torch.compiler.is_compiling():
        return True
    getter = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if getter is None else bool(getter())


def _forward_torch(student, teacher, labels, scale, temperature, div_weight, ce_weight, divergence, beta,
                   ignore_index, soft_label_index, compute_grad):
    """The kernel's algorithm in plain torch: chunks of rows through a few reused buffers (so the
    temporaries stay cache-sized however large the batch is), one exp per element for each softmax,
    and the gradient written in the same sweep. Narrow rows are handled transposed, classes along
    dimension 0, so that every reduction over classes is an elementwise op over long vectors."""
    n_rows, n_classes = student.shape
    acc = _acc_dtype(student, teacher)
    device = student.device
    per_row, grad = _empty_outputs(n_rows, n_classes, acc, student.dtype, device, compute_grad)
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
    kw = dict(temperature=temperature, div_weight=div_weight, ce_weight=ce_weight, divergence=divergence, beta=beta,
              ignore_index=ignore_index, soft_label_index=soft_label_index, dim=dim, grad_scale=scale)
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


def _torch_chunk(s, t, labels, buf_s, buf_t, g, *, temperature, div_weight, ce_weight, divergence, beta,
                 ignore_index, soft_label_index, dim, grad_scale):
    """Per-row losses of one chunk (classes along ``dim``); the gradient, times ``grad_scale`` (a 0-d
    tensor), goes into ``g`` if given."""
    acc = buf_s.dtype
    use_div = div_weight > 0.0
    has_labels = labels is not None and ce_weight > 0.0
    y = None if labels is None else labels.long()
    # rows labelled ignore_index count in no term: their divergence gradient is weighed by 0
    counted = None if y is None or ignore_index is None else (y != ignore_index).to(acc).unsqueeze(dim)
    row_scale = grad_scale if counted is None else counted * grad_scale
    # at T == 1 the cross-entropy softmax is forward KL's student softmax: reuse it
    shared_softmax = use_div and divergence == 0 and temperature == 1.0
    inv_t = 1.0 / temperature
    kd_grad_weight = row_scale * (div_weight * inv_t)
    loss = torch.zeros(s.shape[1 - dim], dtype=acc, device=s.device)
    # (s - max s) / T == s/T - max(s/T) since T > 0; the mixed-dtype subtraction runs in acc
    max_s = s.amax(dim=dim, keepdim=True).to(acc)
    if use_div:
        e_s = torch.sub(s, max_s, out=buf_s)
        e_t = torch.sub(t, t.amax(dim=dim, keepdim=True).to(acc), out=buf_t)
        if inv_t != 1.0:
            e_s.mul_(inv_t)
            e_t.mul_(inv_t)
        if divergence == 0:
            w_t = torch.exp(e_t, out=g) if g is not None else torch.exp(e_t)
            z_t = w_t.sum(dim=dim, keepdim=True)
            # with shifted logits, KL = (w_t . (e_t - e_s)) / z_t - log z_t + log z_s: the maxima cancel
            cross = torch.linalg.vecdot(w_t, e_t, dim=dim).sub_(torch.linalg.vecdot(w_t, e_s, dim=dim))
            w_s = e_s.exp_()
            z_s = w_s.sum(dim=dim, keepdim=True)
            div = cross.div_(z_t.squeeze(dim)).sub_(z_t.squeeze(dim).log()).add_(z_s.squeeze(dim).log())
            if g is not None:
                g.mul_(-kd_grad_weight / z_t)
        elif divergence == 1:
            # RKL = sum_j q_j d_j + log z_t - log z_s with d = e_s - e_t; its gradient q (d - sum q d) / T
            z_t = torch.exp(e_t).sum(dim=dim, keepdim=True)
            w_s = torch.exp(e_s, out=g) if g is not None else torch.exp(e_s)
            z_s = w_s.sum(dim=dim, keepdim=True)
            d = torch.sub(e_s, e_t, out=buf_t)
            mean_d = torch.linalg.vecdot(w_s, d, dim=dim).div_(z_s.squeeze(dim))
            div = mean_d + z_t.squeeze(dim).log() - z_s.squeeze(dim).log()
            if g is not None:
                g.mul_(d.sub_(mean_d.unsqueeze(dim)).mul_(kd_grad_weight / z_s))
        else:
            # in logs: x = log(beta p), y = log((1 - beta) q), log m = logaddexp(x, y), so a class where
            # p and q both underflow keeps a finite log m
            log_beta, log_1m_beta = math.log(beta), math.log1p(-beta)
            log_q = torch.log_softmax(e_s, dim=dim)
            log_p = torch.log_softmax(e_t, dim=dim)
            x = log_p + log_beta
            y_ = log_q + log_1m_beta
            log_m = torch.logaddexp(x, y_)
            q = log_q.exp()
            kl_qm = torch.linalg.vecdot(q, y_ - log_m, dim=dim) - log_1m_beta
            kl_pm = torch.linalg.vecdot(log_p.exp(), x - log_m, dim=dim) - log_beta
            div = beta * kl_pm + (1.0 - beta) * kl_qm
            if g is not None:
                torch.mul(q, (y_ - log_m).sub_((kl_qm + log_1m_beta).unsqueeze(dim)), out=g)
                g.mul_(kd_grad_weight * (1.0 - beta))
        loss.add_(div, alpha=div_weight)
    elif g is not None:
        g.zero_()
    if has_labels:
        keep = torch.ones_like(y, dtype=torch.bool)
        if ignore_index is not None:
            keep &= y != ignore_index
        if soft_label_index is not None:
            keep &= y != soft_label_index
        safe_y = torch.where(keep, y, 0).unsqueeze(dim)
        if shared_softmax:
            w, z = w_s, z_s
        else:
            w = torch.sub(s, max_s, out=buf_t).exp_()
            z = w.sum(dim=dim, keepdim=True)
        s_y = s.gather(dim, safe_y).to(acc)
        # log z - (s_y - max s), not (log z + max s) - s_y: large logits would cancel
        loss.add_(z.log().sub_(s_y.sub_(max_s)).squeeze(dim).mul_(keep), alpha=ce_weight)
        if g is not None:
            ce_scale = keep.to(acc).unsqueeze(dim).mul_(grad_scale * ce_weight)
            if shared_softmax:  # one sweep for both terms: p_s * (alpha*T + (1-alpha)*keep)
                g.addcmul_(w, (ce_scale + kd_grad_weight) / z)
            else:
                g.addcmul_(w, ce_scale / z)
            g.scatter_add_(dim, safe_y, ce_scale.neg())
    if g is not None and use_div and divergence == 0 and not (has_labels and shared_softmax):
        g.addcmul_(w_s, kd_grad_weight / z_s)
    if counted is not None:
        loss.mul_(counted.squeeze(dim))
    return loss


# ------------------------------------------------------------------ the op, as torch sees it
# A torch.library custom op: torch.compile records it as one node of the graph (with its fake
# implementation for shapes) and calls it, Triton kernel or chunked torch code, without tracing into it,
# so nothing in it (the autotuner included) splits a graph. The gradient of the reduced loss is one of
# its outputs, computed in the forward pass with the reduction's scale folded in.


@torch.library.custom_op("sage_fast::kd_loss", mutates_args=())
def _kd_loss_op(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor], scale: torch.Tensor,
                temperature: float, div_weight: float, ce_weight: float, divergence: int, beta: float,
                ignore_index: Optional[int], soft_label_index: Optional[int], reduction: str, triton_path: bool,
                compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per-row losses, gradient of loss for the student (empty unless compute_grad))."""
    forward = _forward_triton if triton_path else _forward_torch
    per_row, grad = forward(student, teacher, labels, scale, temperature, div_weight, ce_weight, divergence, beta,
                            ignore_index, soft_label_index, compute_grad)
    loss = per_row.clone() if reduction == "none" else per_row.sum() * scale
    return loss, per_row, grad if compute_grad else student.new_empty(0)


@_kd_loss_op.register_fake
def _kd_loss_fake(student, teacher, labels, scale, temperature, div_weight, ce_weight, divergence, beta,
                  ignore_index, soft_label_index, reduction, triton_path, compute_grad):
    n_rows = student.shape[0]
    acc = _acc_dtype(student, teacher)
    per_row = student.new_empty((n_rows,), dtype=acc)
    loss = student.new_empty((n_rows,) if reduction == "none" else (), dtype=acc)
    return loss, per_row, student.new_empty(tuple(student.shape) if compute_grad else (0,))


def _kd_loss_setup_context(ctx, inputs, output):
    _, per_row, grad = output
    ctx.reduction = inputs[11]
    ctx.triton_path = inputs[12]
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(per_row, grad)


_NO_DOUBLE_BACKWARD = (
    "kd_loss has no double backward: its gradient is computed in the forward pass and is a constant to "
    "autograd, so a second derivative (create_graph=True, a gradient penalty) would be silently wrong. Use "
    "kd_loss_reference, the same loss as a plain composition of torch ops, where a second derivative is needed")


class _NoDoubleBackward(torch.autograd.Function):
    """Stands between kd_loss's gradient and a graph built with create_graph=True: differentiating
    that gradient raises, with the reason and what to use instead."""

    @staticmethod
    def forward(ctx, grad):
        return grad.clone()

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(_NO_DOUBLE_BACKWARD)


def _kd_loss_backward(ctx, grad_loss, _grad_per_row, _grad_grad):
    """The stored gradient times the incoming one: in place, on the device, for "mean" and "sum" a
    kernel that stops at once when the incoming gradient is 1 (the usual ``loss.backward()``), so that
    case moves no bytes and never waits for the host. On a kept graph (which may run backward again)
    out of place instead."""
    (grad,) = ctx.saved_tensors
    nones = (None,) * 13
    factor = grad_loss.unsqueeze(1) if ctx.reduction == "none" else grad_loss
    if _keep_graph():
        # one rounding, in the gradient's dtype, without a float32 temporary of [N, C]
        result = torch.mul(grad, factor.detach(), out=torch.empty_like(grad))
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # create_graph=True
            result = _NoDoubleBackward.apply(result.requires_grad_(True))
        return (result, *nones)
    if ctx.reduction == "none":
        grad.mul_(factor)
    elif ctx.triton_path:
        _scale_in_place_triton(grad, factor)
    elif grad.device.type != "cpu" or float(factor) != 1.0:  # reading a CPU value costs nothing
        grad.mul_(factor)
    return (grad, *nones)


_kd_loss_op.register_autograd(_kd_loss_backward, setup_context=_kd_loss_setup_context)


# ------------------------------------------------------------------ checks
def _check(student_logits, teacher_logits, labels, temperature, alpha, divergence, beta, scale_by_t2, ignore_index,
           soft_label_index, reduction, num_items_in_batch):
    """Every argument, before any work; returns (temperature, alpha, beta, reduction) normalised."""
    _checks.tensor("student_logits", student_logits, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("teacher_logits", teacher_logits, dtypes=_checks.FLOAT_DTYPES)
    if student_logits.dim() < 2:
        raise ValueError("student_logits must have at least 2 dimensions, [..., V] (rows of V classes; one "
                         f"row is [1, V]), got shape {tuple(student_logits.shape)}")
    _checks.same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    _checks.same_device("student_logits", student_logits, "teacher_logits", teacher_logits)
    lead, n_classes = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    if math.prod(lead) == 0:
        raise ValueError(f"student_logits is empty (no rows in shape {tuple(student_logits.shape)}); pass at least "
                         "one row")
    if n_classes < 1:
        raise ValueError(f"student_logits must have at least 1 class (last dimension), got shape "
                         f"{tuple(student_logits.shape)}")
    temperature = _checks.in_range("temperature", temperature, 0.0, float("inf"), lo_open=True, hi_open=True)
    alpha = _checks.in_range("alpha", alpha, 0.0, 1.0)
    _checks.choice("divergence", divergence, DIVERGENCES)
    beta = _checks.in_range("beta", beta, 0.0, 1.0)
    if not isinstance(scale_by_t2, bool):
        raise ValueError(f"scale_by_t2 must be True or False, got {scale_by_t2!r}")
    _checks.choice("reduction", reduction, REDUCTIONS + ("batchmean",))
    reduction = "mean" if reduction == "batchmean" else reduction
    if ignore_index is not None:
        _checks.integer("ignore_index", ignore_index)
    if soft_label_index is not None:
        _checks.integer("soft_label_index", soft_label_index)
        if soft_label_index == ignore_index:
            raise ValueError(f"soft_label_index must differ from ignore_index, both are {ignore_index}: rows of one "
                             "count in no term, rows of the other keep their divergence term")
    _check_num_items(num_items_in_batch, reduction, student_logits.device)
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise ValueError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must have an integer dtype, got {str(labels.dtype).replace('torch.', '')}")
        if tuple(labels.shape) != lead:
            raise ValueError(f"labels must have shape {lead}, the leading shape of student_logits "
                             f"{tuple(student_logits.shape)}, got {tuple(labels.shape)}")
        _checks.same_device("labels", labels, "student_logits", student_logits)
    if not _checks.values_checked(teacher_logits) or torch.compiler.is_compiling():
        # CUDA without SAGE_FAST_CHECK_VALUES: reading values would make the host wait for the device;
        # the kernel turns an out-of-range label into a NaN loss instead. Under torch.compile a value
        # read on the host would split the graph, so the checks are left out there too.
        return temperature, alpha, beta, reduction
    # every value check in one device round trip
    sum_dtype = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    flags = [torch.isfinite(teacher_logits.detach().sum(dtype=sum_dtype))]
    if labels is not None:
        flags.append(_labels_ok(labels, n_classes, ignore_index, soft_label_index).all())
    if isinstance(num_items_in_batch, torch.Tensor):
        flags.append((num_items_in_batch.detach() > 0).to(flags[0].device))
    flags = torch.stack([f.reshape(()) for f in flags]).tolist()
    # a finite sum proves every value finite; a non-finite one may also be an overflow, so look closer
    if not flags[0]:
        _checks.finite("teacher_logits", teacher_logits.detach())
    if labels is not None and not flags[1]:
        bad = labels[~_labels_ok(labels, n_classes, ignore_index, soft_label_index)]
        raise ValueError(
            f"labels must lie in [0, {n_classes}) or equal ignore_index={ignore_index} or "
            f"soft_label_index={soft_label_index}; found {bad.numel()} out of range, e.g. {int(bad[0])}"
        )
    if isinstance(num_items_in_batch, torch.Tensor) and not flags[-1]:
        raise ValueError(f"num_items_in_batch must be positive, got {num_items_in_batch.item()}")
    return temperature, alpha, beta, reduction


def _labels_ok(labels, n_classes, ignore_index, soft_label_index):
    ok = (labels >= 0) & (labels < n_classes)
    for special in (ignore_index, soft_label_index):
        if special is not None:
            ok |= labels == special
    return ok


def _check_num_items(num_items_in_batch, reduction, device):
    if num_items_in_batch is None:
        return
    if reduction == "none":
        raise ValueError("num_items_in_batch divides a summed loss; it has no meaning with reduction='none'")
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.dim() != 0 or num_items_in_batch.dtype == torch.bool or num_items_in_batch.is_complex():
            raise ValueError("num_items_in_batch must be a positive int or a 0-d real tensor, got a tensor of shape "
                             f"{tuple(num_items_in_batch.shape)} and dtype {num_items_in_batch.dtype}")
        if num_items_in_batch.device.type != "cpu" and num_items_in_batch.device != device:
            raise ValueError(f"num_items_in_batch is on {num_items_in_batch.device}, the logits on {device}")
        return
    _checks.integer("num_items_in_batch", num_items_in_batch, minimum=1)


def _divergence_code(divergence, beta):
    """0 forward KL, 1 reverse KL, 2 JSD. TRL's generalized JSD is forward KL at beta == 0 and reverse
    KL at beta == 1 (its mixture formula would give 0 there), and so is this op's."""
    if divergence == "jsd":
        return 0 if beta == 0.0 else 1 if beta == 1.0 else 2
    return DIVERGENCES.index(divergence)


def _reduction_scale(reduction, labels, ignore_index, num_items_in_batch, n_rows, acc, device):
    """The factor from the per-row sum to the loss, as a 0-d ``acc`` tensor on ``device``. What is
    counted ("mean" over the rows whose label is not ``ignore_index``) is counted on the device, and
    a tensor ``num_items_in_batch`` is used where it lies: the host never waits for a value."""
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            on_host = num_items_in_batch.device.type == "cpu" and device.type != "cpu"
            if not on_host or torch.compiler.is_compiling():
                return torch.reciprocal(num_items_in_batch.detach().to(device=device, dtype=acc))
            # a CPU value is read for free, where copying it to the device would wait for the copy
            num_items_in_batch = float(num_items_in_batch)
        return torch.full((), 1.0 / num_items_in_batch, dtype=acc, device=device)
    if reduction != "mean":
        return torch.ones((), dtype=acc, device=device)
    if labels is None or ignore_index is None:
        return torch.full((), 1.0 / n_rows, dtype=acc, device=device)
    # a batch with every row ignored has the loss 0 (and the gradient 0), not 0/0
    return torch.reciprocal((labels != ignore_index).sum().clamp_min(1).to(acc))


# ------------------------------------------------------------------ public functions
def kd_loss(student_logits, teacher_logits, labels=None, *, temperature=1.0, alpha=1.0, divergence="forward_kl",
            beta=0.5, scale_by_t2=True, ignore_index=-100, soft_label_index=None, reduction="mean",
            num_items_in_batch=None, return_per_example=False):
    """Distillation loss ``alpha * w * D(t, s) + (1 - alpha) * CE(s, y)`` per row, reduced.

    ``D`` is the divergence at temperature T (p = softmax(t/T), q = softmax(s/T)), ``w = T^2`` (or 1),
    and CE the untempered cross-entropy to the label. The gradient is computed in the forward pass.

    Args:
        student_logits: ``[..., V]`` float32, bfloat16, float16 or float64 logits (``[N, C]`` for a
            classifier, ``[B, T, V]`` for a language model); the gradient flows here, in this dtype.
            Rows are flattened internally, without a copy when the strides allow it.
        teacher_logits: logits of the same shape on the same device, all finite, in any of those
            dtypes: each input is read in its own dtype and the loss computed in float32 (float64 when
            either is float64). A target: treated as detached even if it requires grad.
        labels: optional integer labels of the leading shape (``[N]``, ``[B, T]``): a class id in
            ``[0, V)``, ``ignore_index`` or ``soft_label_index``. ``None``: every row counts, with no
            cross-entropy.
        temperature: ``T > 0``.
        alpha: weight of the divergence in ``[0, 1]``; ``1 - alpha`` weighs the cross-entropy.
        divergence: ``"forward_kl"`` KL(p || q) (Hinton's KD, GKD at beta 0), ``"reverse_kl"``
            KL(q || p) (mode-seeking, on-policy distillation), or ``"jsd"``, the generalized
            Jensen-Shannon divergence ``beta KL(p || m) + (1 - beta) KL(q || m)``, m = beta p +
            (1 - beta) q, as TRL's GKD and Liger define it: forward KL at ``beta == 0``, reverse KL at
            ``beta == 1``.
        beta: the JSD's ``beta`` in ``[0, 1]``; ignored by the other divergences.
        scale_by_t2: multiply the divergence by ``T^2`` (Hinton's convention: its gradient does not
            shrink as T grows). ``False`` gives TRL's and Liger's numbers.
        ignore_index: rows with this label (padding, prompt tokens) count in no term and not in the
            mean: loss 0, gradient 0, as in TRL, Liger and ``F.cross_entropy``. ``None``: no row is
            ignored.
        soft_label_index: rows with this label keep their divergence term and count in the mean, but
            have no cross-entropy (rows without a gold label, such as SAGE's synthetic rows).
        reduction: ``"mean"`` over the rows that count (the loss and gradient are 0 when none does;
            ``"batchmean"``, TRL's name, is the same), ``"sum"``, or ``"none"`` (the per-row losses in
            the leading shape, differentiable).
        num_items_in_batch: an int or a 0-d tensor (transformers' gradient-accumulation normaliser):
            the loss is the sum over rows divided by it, whatever ``reduction`` says ("mean" or
            "sum"); a tensor is used on the device, never read by the host.
        return_per_example: also return the detached float32 per-row losses, in the leading shape.

    Returns the loss (float32; float64 when an input is float64), or ``(loss, per_example)``.
    Runs the fused Triton kernel on CUDA (or under ``TRITON_INTERPRET=1``), a chunked plain-torch
    implementation otherwise; either way a ``torch.library`` custom op (``sage_fast::kd_loss``), so
    ``torch.compile(fullgraph=True)`` takes it whole. Values (finite teacher, labels in range, a positive
    ``num_items_in_batch``) are checked on CPU tensors (except under ``torch.compile``), and on CUDA only
    when asked (``sage_fast.check_values(True)`` or ``SAGE_FAST_CHECK_VALUES=1``), as the check makes the
    host wait for the device; unchecked, a label out of range gives that row a NaN loss. On CUDA the
    first call for a class count and batch size class tunes the kernel's tiles (and synchronises);
    later calls never wait for the device. The op has no double backward: a second derivative
    (``create_graph=True``) raises, and ``kd_loss_reference`` is the composition to use there.
    """
    temperature, alpha, beta, reduction = _check(
        student_logits, teacher_logits, labels, temperature, alpha, divergence, beta, scale_by_t2, ignore_index,
        soft_label_index, reduction, num_items_in_batch)
    lead, n_classes = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    # reshape is a view whenever the leading dimensions merge into one row stride
    student = student_logits.reshape(-1, n_classes)
    student = student if student.stride(1) == 1 else student.contiguous()
    teacher = teacher_logits.detach().reshape(-1, n_classes)
    teacher = teacher if teacher.stride(1) == 1 else teacher.contiguous()
    if labels is not None:
        labels = labels.reshape(-1)
        labels = labels if labels.is_contiguous() else labels.contiguous()
    triton_path = use_triton(student.device)
    acc = _acc_dtype(student, teacher)
    scale = _reduction_scale(reduction, labels, ignore_index, num_items_in_batch, student.shape[0], acc,
                             student.device)
    div_weight = alpha * temperature * temperature if scale_by_t2 else alpha
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    loss, per_row, _ = torch.ops.sage_fast.kd_loss(
        student, teacher, labels, scale, temperature, div_weight, 1.0 - alpha, _divergence_code(divergence, beta),
        beta, ignore_index, soft_label_index, reduction, triton_path, compute_grad)
    if reduction == "none":
        loss = loss.reshape(lead)
    if not return_per_example:
        return loss
    return loss, per_row.detach().float().reshape(lead)


def kd_loss_reference(student_logits, teacher_logits, labels=None, *, temperature=1.0, alpha=1.0,
                      divergence="forward_kl", beta=0.5, scale_by_t2=True, ignore_index=-100, soft_label_index=None,
                      reduction="mean", num_items_in_batch=None, return_per_example=False):
    """The same loss as a plain composition of torch ops (at least float32; float64 when an input is),
    differentiable to any order."""
    if reduction == "batchmean":
        reduction = "mean"
    n_classes = student_logits.shape[-1]
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    s = student_logits.to(dtype).reshape(-1, n_classes)
    t = teacher_logits.detach().to(dtype).reshape(-1, n_classes)
    log_q = torch.log_softmax(s / temperature, dim=1)
    log_p = torch.log_softmax(t / temperature, dim=1)
    code = _divergence_code(divergence, beta)
    if code == 0:
        div = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    elif code == 1:
        div = (log_q.exp() * (log_q - log_p)).sum(dim=1)
    else:
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), dim=0)
        div = (beta * (log_p.exp() * (log_p - log_m)).sum(dim=1)
               + (1.0 - beta) * (log_q.exp() * (log_q - log_m)).sum(dim=1))
    per_row = alpha * (temperature**2 if scale_by_t2 else 1.0) * div
    counted = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    if labels is not None:
        y = labels.reshape(-1).long()
        if ignore_index is not None:
            counted = y != ignore_index
        hard = counted if soft_label_index is None else counted & (y != soft_label_index)
        ce = torch.nn.functional.cross_entropy(s, torch.where(hard, y, -100), ignore_index=-100, reduction="none")
        per_row = torch.where(counted, per_row + (1.0 - alpha) * ce, 0.0)
    if num_items_in_batch is not None:
        loss = per_row.sum() / num_items_in_batch
    elif reduction == "mean":
        loss = per_row.sum() / counted.sum().clamp_min(1)
    elif reduction == "sum":
        loss = per_row.sum()
    else:
        loss = per_row.reshape(student_logits.shape[:-1])
    if not return_per_example:
        return loss
    return loss, per_row.detach().float().reshape(student_logits.shape[:-1])
