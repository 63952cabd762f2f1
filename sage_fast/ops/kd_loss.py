"""Fused knowledge-distillation loss: tempered KL to the teacher plus cross-entropy to the labels.

For row ``i`` with student logits ``s``, teacher logits ``t``, label ``y``, temperature ``T`` and
weight ``alpha``::

    l_i = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)

Everything is computed from max-shifted logits ``u = t - max t`` and ``v = s - max s``, so no two
large numbers ever cancel (logits of 1e4 keep a float32 loss accurate to ~1e-6, not ~1e-3)::

    KL = sum_j p_j (u_j - v_j) / T  -  log Z_t  +  log Z_s,    Z_t = sum_j exp(u_j/T), p = exp(u/T) / Z_t
    CE = log sum_j exp(v_j)  -  v_y          (0 where y == ignore_index, or when no labels are given)

(the maxima cancel exactly between the three terms of ``KL``). CE uses the untempered student
logits. The gradient with respect to the student is::

    dl_i/ds_j = alpha * T * (softmax(s/T)_j - p_j)  +  (1 - alpha) * (softmax(s)_j - [j == y])

The kernel reads each input once: a row that fits one tile is loaded, reduced and turned into its
gradient from registers; a wider row streams tile by tile (running maxima and sums, rescaled when a
maximum grows) and is read a second time for the gradient, from L2 while the working set fits. The
gradient is written once, in the student's dtype, with the reduction's scale folded in, so backward
has nothing to do for the usual ``loss.backward()``. Per element: one exp2 for each softmax (two at
T == 1 or T == 2, where the untempered one is the tempered one, or its square) with the constants
folded into one multiply, no masks on full tiles, and the ``-[j == y]`` term written afterwards as
one element per row instead of a comparison per element. When nothing needs a gradient
(evaluation, error-profile refresh) nothing is written but the losses.

On CUDA nothing synchronises with the host: value checks (finite teacher, labels in range) run on
CPU tensors and, on CUDA, only when asked (``sage_fast.check_values``); an out-of-range label the
kernel meets makes that row's loss NaN instead of reading out of bounds. Backward scales the stored
gradient in place by a kernel that does nothing when the incoming gradient is 1, decided on the
device.

The teacher is a target: no gradient flows to ``teacher_logits`` even if it requires one.
"""
from __future__ import annotations

import functools
import struct

import torch
from torch.autograd.function import once_differentiable

from .. import _checks
from .._backend import use_triton

__all__ = ["kd_loss", "kd_loss_reference"]

REDUCTIONS = ("mean", "sum", "none")

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
# Tests set this to fill the outputs with NaN before the launch, so that unwritten elements show up.
_POISON_OUTPUTS = False

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
    def _grad_tile(e_st, e_t, e_s, coef_st, coef_t, coef_s, USE_KL: tl.constexpr, HAS_LABELS: tl.constexpr,
                   TEMP_MODE: tl.constexpr):
        """coef_st * e_st + coef_t * e_t + coef_s * e_s, the per-row coefficients holding 1/Z and the
        weights; at T == 1 the two student softmaxes are one, so one multiply-add less."""
        if USE_KL:
            if HAS_LABELS and TEMP_MODE == 1:
                g = e_st * (coef_st + coef_s)[:, None] + e_t * coef_t[:, None]
            else:
                g = e_st * coef_st[:, None] + e_t * coef_t[:, None]
                if HAS_LABELS:
                    g += e_s * coef_s[:, None]
        elif HAS_LABELS:
            g = e_s * coef_s[:, None]
        else:  # alpha == 0 and no labels: the loss is 0
            g = tl.zeros_like(e_s)
        return g

    @triton.jit
    def _exps(s, t, m_s, m_t, k, USE_KL: tl.constexpr, HAS_LABELS: tl.constexpr, TEMP_MODE: tl.constexpr):
        """exp((t - m_t)/T), exp((s - m_s)/T), exp(s - m_s) and the shifted logits, as exp2 of one
        multiply each (k = log2(e)/T). At T == 2 the untempered softmax is the square of the tempered
        one: a multiply instead of an exponential."""
        v = s - m_s[:, None]
        u = v
        e_t = v
        e_st = v
        e_s = v
        if USE_KL:
            u = t - m_t[:, None]
            e_t = tl.exp2(u * k)
            e_st = tl.exp2(v * k)
        if HAS_LABELS:
            if USE_KL and TEMP_MODE == 1:
                e_s = e_st
            elif USE_KL and TEMP_MODE == 2:
                e_s = e_st * e_st
            else:
                e_s = tl.exp2(v * _LOG2E)
        return u, v, e_t, e_st, e_s

    @triton.jit
    def _stream_stats(s_base, t_base, c, row_ok, n_classes, m_s, m_t, d_t, d_st, d_s, cross, k, ACC: tl.constexpr,
                      EVEN_ROWS: tl.constexpr, EVEN_C: tl.constexpr, USE_KL: tl.constexpr, HAS_LABELS: tl.constexpr,
                      TEMP_MODE: tl.constexpr):
        """One tile of a streamed row: the running maxima grow, and the sums are rescaled to them."""
        s = _load_tile(s_base, c, row_ok, n_classes, ACC, EVEN_ROWS, EVEN_C)
        m_s_new = tl.maximum(m_s, tl.max(s, axis=1))
        shift_s = m_s - m_s_new  # <= 0; about -1e30 on the first tile, where the sums are 0
        t = s
        m_t_new = m_s_new
        if USE_KL:
            t = _load_tile(t_base, c, row_ok, n_classes, ACC, EVEN_ROWS, EVEN_C)
            m_t_new = tl.maximum(m_t, tl.max(t, axis=1))
        u, v, e_t, e_st, e_s = _exps(s, t, m_s_new, m_t_new, k, USE_KL, HAS_LABELS, TEMP_MODE)
        if USE_KL:
            shift_t = m_t - m_t_new
            r_t = tl.exp2(shift_t * k)
            # moving both maxima moves every earlier (u_j - v_j) by shift_t - shift_s
            cross = r_t * (cross + (shift_t - shift_s) * d_t) + tl.sum(e_t * (u - v), axis=1)
            d_t = r_t * d_t + tl.sum(e_t, axis=1)
            d_st = tl.exp2(shift_s * k) * d_st + tl.sum(e_st, axis=1)
        if HAS_LABELS:
            d_s = tl.exp2(shift_s * _LOG2E) * d_s + tl.sum(e_s, axis=1)
        return m_s_new, m_t_new, d_t, d_st, d_s, cross

    @triton.jit
    def _stream_grad(s_base, t_base, g_base, c, row_ok, n_classes, m_s, m_t, k, coef_st, coef_t, coef_s,
                     ACC: tl.constexpr, EVEN_ROWS: tl.constexpr, EVEN_C: tl.constexpr, USE_KL: tl.constexpr,
                     HAS_LABELS: tl.constexpr, TEMP_MODE: tl.constexpr):
        """One tile of a streamed row's gradient, from the row's final maxima and sums."""
        s = _load_tile(s_base, c, row_ok, n_classes, ACC, EVEN_ROWS, EVEN_C)
        t = s
        if USE_KL:
            t = _load_tile(t_base, c, row_ok, n_classes, ACC, EVEN_ROWS, EVEN_C)
        u, v, e_t, e_st, e_s = _exps(s, t, m_s, m_t, k, USE_KL, HAS_LABELS, TEMP_MODE)
        g = _grad_tile(e_st, e_t, e_s, coef_st, coef_t, coef_s, USE_KL, HAS_LABELS, TEMP_MODE)
        _store_tile(g_base, c, g, row_ok, n_classes, EVEN_ROWS, EVEN_C)

    @triton.jit
    def _kd_loss_kernel(
        student_ptr, teacher_ptr, labels_ptr, loss_ptr, grad_ptr,
        n_rows, n_classes_v, stride_student_v, stride_teacher_v, stride_grad_v, rows_bucket,
        temperature, temperature_lo, alpha, alpha_lo, grad_scale, grad_scale_lo, ignore_index,
        USE_KL: tl.constexpr, HAS_LABELS: tl.constexpr, COMPUTE_GRAD: tl.constexpr, TEMP_MODE: tl.constexpr,
        ACC: tl.constexpr, VEC: tl.constexpr, CONTIGUOUS: tl.constexpr, FAST_MATH: tl.constexpr,
        BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE_TILE: tl.constexpr, EVEN_C: tl.constexpr,
    ):
        # every program but the last has all its rows: it runs a copy of the code without row masks
        # (a mask that is not constant over 16 bytes, as on flat runs of narrow rows, narrows the access)
        if BLOCK_ROWS == 1:
            _kd_loss_rows(
                student_ptr, teacher_ptr, labels_ptr, loss_ptr, grad_ptr, n_rows, n_classes_v, stride_student_v,
                stride_teacher_v, stride_grad_v, temperature, temperature_lo, alpha, alpha_lo, grad_scale,
                grad_scale_lo, ignore_index, USE_KL, HAS_LABELS, COMPUTE_GRAD, TEMP_MODE, ACC, VEC, CONTIGUOUS,
                FAST_MATH, BLOCK_ROWS, BLOCK_C, SINGLE_TILE, True, EVEN_C)
        elif (tl.program_id(0) + 1) * BLOCK_ROWS <= n_rows:
            _kd_loss_rows(
                student_ptr, teacher_ptr, labels_ptr, loss_ptr, grad_ptr, n_rows, n_classes_v, stride_student_v,
                stride_teacher_v, stride_grad_v, temperature, temperature_lo, alpha, alpha_lo, grad_scale,
                grad_scale_lo, ignore_index, USE_KL, HAS_LABELS, COMPUTE_GRAD, TEMP_MODE, ACC, VEC, CONTIGUOUS,
                FAST_MATH, BLOCK_ROWS, BLOCK_C, SINGLE_TILE, True, EVEN_C)
        else:
            _kd_loss_rows(
                student_ptr, teacher_ptr, labels_ptr, loss_ptr, grad_ptr, n_rows, n_classes_v, stride_student_v,
                stride_teacher_v, stride_grad_v, temperature, temperature_lo, alpha, alpha_lo, grad_scale,
                grad_scale_lo, ignore_index, USE_KL, HAS_LABELS, COMPUTE_GRAD, TEMP_MODE, ACC, VEC, CONTIGUOUS,
                FAST_MATH, BLOCK_ROWS, BLOCK_C, SINGLE_TILE, False, EVEN_C)

    @triton.jit
    def _kd_loss_rows(
        student_ptr, teacher_ptr, labels_ptr, loss_ptr, grad_ptr,
        n_rows, n_classes_v, stride_student_v, stride_teacher_v, stride_grad_v,
        temperature, temperature_lo, alpha, alpha_lo, grad_scale, grad_scale_lo, ignore_index,
        USE_KL: tl.constexpr, HAS_LABELS: tl.constexpr, COMPUTE_GRAD: tl.constexpr, TEMP_MODE: tl.constexpr,
        ACC: tl.constexpr, VEC: tl.constexpr, CONTIGUOUS: tl.constexpr, FAST_MATH: tl.constexpr,
        BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
        SINGLE_TILE: tl.constexpr, EVEN_ROWS: tl.constexpr, EVEN_C: tl.constexpr,
    ):
        """One program's rows: the whole op. EVEN_ROWS: every row exists (no row masks)."""
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
        kd_weight = tl.cast(alpha, ACC) + tl.cast(alpha_lo, ACC)
        ce_weight = 1.0 - kd_weight

        # per row: maxima m_s, m_t; sums Z_t (d_t), Z_s at T (d_st) and at 1 (d_s);
        # cross = sum_j exp(u_j / T) * (u_j - v_j), u and v shifted by the current maxima
        if SINGLE_TILE:
            if FLAT:
                s = _load_flat(student_ptr, row0, n_rows, ACC, BLOCK_ROWS, BLOCK_C, EVEN_ROWS)
            else:
                s = _load_tile(s_base, cols, row_ok, n_classes, ACC, EVEN_ROWS, EVEN_C)
            m_s = tl.max(s, axis=1)
            t = s
            m_t = m_s
            if USE_KL:
                if FLAT:
                    t = _load_flat(teacher_ptr, row0, n_rows, ACC, BLOCK_ROWS, BLOCK_C, EVEN_ROWS)
                else:
                    t = _load_tile(t_base, cols, row_ok, n_classes, ACC, EVEN_ROWS, EVEN_C)
                m_t = tl.max(t, axis=1)
            u, v, e_t, e_st, e_s = _exps(s, t, m_s, m_t, k, USE_KL, HAS_LABELS, TEMP_MODE)
            d_t = tl.sum(e_t, axis=1)
            d_st = tl.sum(e_st, axis=1)
            d_s = tl.sum(e_s, axis=1)
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
                    ACC, EVEN_ROWS, True, USE_KL, HAS_LABELS, TEMP_MODE)
            if not EVEN_C:
                m_s, m_t, d_t, d_st, d_s, cross = _stream_stats(
                    s_base, t_base, n_full + cols, row_ok, n_classes, m_s, m_t, d_t, d_st, d_s, cross, k,
                    ACC, EVEN_ROWS, False, USE_KL, HAS_LABELS, TEMP_MODE)

        # every sum is >= 1 (the maximum contributes exp(0)), also on rows past the end
        loss = tl.zeros([BLOCK_ROWS], ACC)
        r_t = _rcp(d_t, FAST_MATH)
        if USE_KL:
            # log Z_s - log Z_t as one log of the ratio: one logarithm less, and no cancellation
            kl = cross * inv_t * r_t + _log(d_st * r_t, FAST_MATH)
            loss += kd_weight * temp * temp * kl
        y_ok = row_ok
        y_safe = rows
        hit = cols[None, :] < 0
        if HAS_LABELS:
            if EVEN_ROWS:
                y = tl.load(labels_ptr + rows).to(tl.int64)
            else:
                y = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
            labelled = row_ok & (y != ignore_index)
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
            loss += tl.where(y_ok, ce_weight * ce, 0.0)
            # a label outside [0, C) that was not checked on the host: a NaN loss says so, instead of
            # reading memory past the row
            loss = tl.where(labelled & ~in_range, _INF - _INF, loss)
        if EVEN_ROWS:
            tl.store(loss_ptr + rows, loss)
        else:
            tl.store(loss_ptr + rows, loss, mask=row_ok)

        if COMPUTE_GRAD:
            g_base = grad_ptr + rows64 * (stride_grad_v * VEC)
            # the reduction's scale (1/N for "mean") is folded in, so backward need not touch the gradient
            gscale = tl.cast(grad_scale, ACC) + tl.cast(grad_scale_lo, ACC)
            kd_grad_weight = kd_weight * temp * gscale
            ce_grad_weight = ce_weight * gscale
            coef_st = kd_grad_weight * _rcp(d_st, FAST_MATH)
            coef_t = -kd_grad_weight * r_t
            coef_s = coef_t
            if HAS_LABELS:
                coef_s = tl.where(y_ok, ce_grad_weight * _rcp(d_s, FAST_MATH), 0.0)
            if SINGLE_TILE:
                g = _grad_tile(e_st, e_t, e_s, coef_st, coef_t, coef_s, USE_KL, HAS_LABELS, TEMP_MODE)
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
                                 coef_s, ACC, EVEN_ROWS, True, USE_KL, HAS_LABELS, TEMP_MODE)
                if not EVEN_C:
                    _stream_grad(s_base, t_base, g_base, n_full + cols, row_ok, n_classes, m_s, m_t, k, coef_st, coef_t,
                                 coef_s, ACC, EVEN_ROWS, False, USE_KL, HAS_LABELS, TEMP_MODE)
            if HAS_LABELS and not LABEL_IN_TILE:
                # the label's -1: one element per row, rewritten once every thread's tile store is
                # visible (a barrier), instead of a comparison with y at every element
                tl.debug_barrier()
                # rows without a label are not stored; keep their exponents at 0 all the same
                v_y1 = tl.where(y_ok, v_y, 0.0)[:, None]
                t_y1 = v_y1
                if USE_KL:
                    t_y = tl.load(t_base + y_safe, mask=y_ok, other=0.0).to(ACC)
                    t_y1 = tl.where(y_ok, t_y, m_t)[:, None]
                _, _, e_t_y, e_st_y, e_s_y = _exps(v_y1, t_y1, m_s * 0.0, m_t, k, USE_KL, HAS_LABELS, TEMP_MODE)
                g_y = tl.sum(_grad_tile(e_st_y, e_t_y, e_s_y, coef_st, coef_t, coef_s, USE_KL, HAS_LABELS,
                                        TEMP_MODE), axis=1) - ce_grad_weight
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
        The first call for a key benchmarks the candidates (and synchronises); later ones do not."""
        return triton.autotune(
            configs=[triton.Config({"BLOCK_ROWS": r, "BLOCK_C": c}, num_warps=w) for r, c, w in configs],
            key=["n_classes_v", "VEC", "rows_bucket", "USE_KL", "HAS_LABELS", "COMPUTE_GRAD", "TEMP_MODE"],
        )(_kd_loss_heuristic)


def _forward_triton(student, teacher, labels, temperature, alpha, ignore_index, compute_grad, grad_scale):
    n_rows, n_classes = student.shape
    acc = _acc_dtype(student, teacher)
    per_row = torch.empty(n_rows, dtype=acc, device=student.device)
    grad = torch.empty((n_rows, n_classes), dtype=student.dtype, device=student.device) if compute_grad else None
    if _POISON_OUTPUTS:
        per_row.fill_(float("nan"))
        if grad is not None:
            grad.fill_(float("nan"))
    use_kl = alpha > 0.0
    has_labels = labels is not None and alpha < 1.0
    grad_stride = grad.stride(0) if compute_grad else 0
    vec = _vector_width(n_classes, student.stride(0), teacher.stride(0), grad_stride)
    if student.device.type == "cuda":
        configs = _gpu_configs(n_classes, min(student.element_size(), teacher.element_size()), MAX_BLOCK_C)
    else:
        configs = (_interpreter_config(n_rows, n_classes),)
    _tuned_kernel(configs)[lambda meta: (triton.cdiv(n_rows, meta["BLOCK_ROWS"]),)](
        student, teacher, labels if has_labels else student, per_row, grad if compute_grad else per_row,
        n_rows, n_classes // vec, student.stride(0) // vec, teacher.stride(0) // vec, grad_stride // vec,
        _rows_bucket(n_rows),
        *_float32_pair(temperature), *_float32_pair(alpha), *_float32_pair(grad_scale), int(ignore_index),
        USE_KL=use_kl, HAS_LABELS=has_labels, COMPUTE_GRAD=compute_grad,
        TEMP_MODE=1 if temperature == 1.0 else 2 if temperature == 2.0 else 0,
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


def _forward_torch(student, teacher, labels, temperature, alpha, ignore_index, compute_grad, grad_scale):
    """The kernel's algorithm in plain torch: chunks of rows through a few reused buffers (so the
    temporaries stay cache-sized however large the batch is), one exp per element for each softmax,
    and the gradient written in the same sweep. Narrow rows are handled transposed, classes along
    dimension 0, so that every reduction over classes is an elementwise op over long vectors."""
    n_rows, n_classes = student.shape
    acc = _acc_dtype(student, teacher)
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
        # log z - (s_y - max s), not (log z + max s) - s_y: large logits would cancel
        loss.add_(z.log().sub_(s_y.sub_(max_s)).squeeze(dim).mul_(keep), alpha=ce_weight)
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

    The reduction happens here so that its scale is folded into the stored gradient. Backward
    multiplies that gradient by the incoming one in place, on the device: for "mean" and "sum" a
    kernel that stops at once when the incoming gradient is 1 (the usual ``loss.backward()``), so
    that case moves no bytes and never waits for the host. On a retained graph (which may run
    backward again) it multiplies out of place instead.
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, temperature, alpha, ignore_index, triton_path, reduction):
        compute_grad = ctx.needs_input_grad[0]
        n_rows = student.shape[0]
        grad_scale = 1.0 / n_rows if reduction == "mean" else 1.0
        forward = _forward_triton if triton_path else _forward_torch
        per_row, grad = forward(student, teacher, labels, temperature, alpha, ignore_index, compute_grad, grad_scale)
        ctx.reduction = reduction
        ctx.triton_path = triton_path
        if compute_grad:
            ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(per_row)
        if reduction == "none":
            loss = per_row.clone()
        else:
            loss = per_row.sum() / (n_rows if reduction == "mean" else 1)
        return loss, per_row

    @staticmethod
    @once_differentiable  # the stored gradient is a constant: a second derivative would be silently 0
    def backward(ctx, grad_loss, _grad_per_row):
        (grad,) = ctx.saved_tensors
        factor = grad_loss.unsqueeze(1) if ctx.reduction == "none" else grad_loss
        if _keep_graph():
            # one rounding, in the gradient's dtype, without a float32 temporary of [N, C]
            return torch.mul(grad, factor, out=torch.empty_like(grad)), None, None, None, None, None, None, None
        if ctx.reduction == "none":
            grad.mul_(factor)
        elif ctx.triton_path:
            _scale_in_place_triton(grad, factor)
        elif grad.device.type != "cpu" or float(factor) != 1.0:  # reading a CPU value costs nothing
            grad.mul_(factor)
        return grad, None, None, None, None, None, None, None


def _check(student_logits, teacher_logits, labels, temperature, alpha, ignore_index, reduction):
    _checks.tensor("student_logits", student_logits, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("teacher_logits", teacher_logits, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    _checks.same_device("student_logits", student_logits, "teacher_logits", teacher_logits)
    _checks.non_empty("student_logits", student_logits, 0)
    n_rows, n_classes = student_logits.shape
    if n_classes < 1:
        raise ValueError(f"student_logits must have at least 1 class (dimension 1), got shape {tuple(student_logits.shape)}")
    temperature = _checks.in_range("temperature", temperature, 0.0, float("inf"), lo_open=True, hi_open=True)
    alpha = _checks.in_range("alpha", alpha, 0.0, 1.0)
    _checks.choice("reduction", reduction, REDUCTIONS)
    _checks.integer("ignore_index", ignore_index)
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise ValueError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must have an integer dtype, got {str(labels.dtype).replace('torch.', '')}")
        if labels.shape != (n_rows,):
            raise ValueError(f"labels must have shape ({n_rows},) to match student_logits, got {tuple(labels.shape)}")
        _checks.same_device("labels", labels, "student_logits", student_logits)
    if not _checks.values_checked(teacher_logits) or torch.compiler.is_compiling():
        # CUDA without SAGE_FAST_CHECK_VALUES: reading values would make the host wait for the device;
        # the kernel turns an out-of-range label into a NaN loss instead. Under torch.compile a value
        # read on the host would split the graph, so the checks are left out there too (on the CPU,
        # the compiled gather then refuses such a label with a RuntimeError).
        return temperature, alpha
    # both value checks in one device round trip
    sum_dtype = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    flags = [torch.isfinite(teacher_logits.detach().sum(dtype=sum_dtype))]
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
        student_logits: ``[N, C]`` float32, bfloat16, float16 or float64 logits; the gradient flows
            here, in this dtype.
        teacher_logits: ``[N, C]`` logits on the same device, all finite, in any of those dtypes:
            each input is read in its own dtype and the loss computed in float32 (float64 when
            either is float64), so float32 teacher logits beyond float16's range are fine with a
            float16 student. A target: treated as detached even if it requires grad.
        labels: optional ``[N]`` integer class ids in ``[0, C)`` or ``ignore_index``; ``None`` (or an
            ignored row) contributes no cross-entropy.
        temperature: ``T > 0``; the KL term is scaled by ``T^2`` so its gradient does not shrink with T.
        alpha: weight of the KL term in ``[0, 1]``; ``1 - alpha`` weighs the (untempered) cross-entropy.
        reduction: ``"mean"`` over all N rows (ignored rows count in the denominator), ``"sum"`` or
            ``"none"`` (the differentiable ``[N]`` vector).
        return_per_example: also return the detached float32 ``[N]`` vector of per-row losses.

    Returns the loss (float32; float64 when an input is float64), or ``(loss, per_example)``.
    Runs the fused Triton kernel on CUDA (or under ``TRITON_INTERPRET=1``), a chunked plain-torch
    implementation otherwise. Values (finite teacher, labels in range) are checked on CPU tensors
    (except under ``torch.compile``), and on CUDA only when asked (``sage_fast.check_values(True)``
    or ``SAGE_FAST_CHECK_VALUES=1``), as the check makes the host wait for the device; unchecked, a
    label out of range gives that row a NaN loss. On CUDA the first call for a class count and batch
    size class tunes the kernel's tiles (and synchronises); later calls never wait for the device.
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
    """The same loss as a plain composition of torch ops (at least float32; float64 when an input is)."""
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
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
