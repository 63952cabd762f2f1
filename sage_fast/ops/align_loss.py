"""Hidden-state alignment loss over several layer pairs, fused into one kernel launch.

For layer pairs ``p = 1..P`` with student states ``s_p`` and teacher states ``t_p`` of shape
``[N, L, H_p]`` and valid tokens ``V_i = {l : mask[i, l] != 0}`` (the mask holds 0 and 1), the loss of
example ``i`` is

    l_i = sum_p w_p * ( mse_weight    / (|V_i| H_p) * sum_{l in V_i} ||s_pil - t_pil||^2
                      + cosine_weight / |V_i|       * sum_{l in V_i} (1 - cos(s_pil, t_pil)) )

with ``cos(s, t) = s.t / (max(||s||, eps) max(||t||, eps))``, ``eps = 1e-8`` (as torch clamps
norms); an example with no valid token has ``l_i = 0``. The gradient with respect to ``s`` is

    d l_i / d s = w_p * valid / |V_i| * ( mse_weight * 2 (s - t) / H_p
                  - cosine_weight * ( t / (max(||s||, eps) max(||t||, eps)) - [||s|| > eps] cos s / ||s||^2 ) )

Gradients flow to the student states only: the teacher is a constant. The forward pass writes
this gradient (in the student dtype) next to the loss, so the backward pass is only a scale by the
incoming gradient, done in place by a kernel that reads the scale on the device and leaves the
gradient untouched when it is 1 (no host synchronisation, no pass over the data in the usual case).

One launch covers every pair: each pair's student, teacher and gradient tensors reach the kernel as
typed pointers (tuples of kernel arguments, with their strides and sizes), so pairs need not be
stacked (a copy) and nothing is copied to the device per call; the hidden dimension has unit stride
(other layouts are made contiguous first), so loads and stores are 16-byte vectors. The hidden
dimension is covered by power-of-two tiles that fit it (768 = 512 + 256, not one 1024-wide tile
with a quarter of its lanes idle); a row wider than ``MAX_BLOCK_H`` is walked in chunks. Weights are
kernel arguments in float32 (for float64 states they carry float32 rounding, about 6e-8 relative).

Value checks: the mask must hold only 0 and 1 (or be bool); other values are refused with a
``ValueError`` where values are checked (for CPU tensors, except under ``torch.compile``; on CUDA with
``sage_fast.check_values(True)`` or ``SAGE_FAST_CHECK_VALUES=1``, since the check costs a device
synchronisation). Unchecked, any non-zero value counts as a valid token.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import _checks
from .._backend import interpreter_enabled, use_triton

__all__ = ["align_loss", "align_loss_reference"]

EPS = 1e-8
REDUCTIONS = ("mean", "sum", "none")
#: Widest hidden tile one program holds; wider states are walked in chunks of this size.
MAX_BLOCK_H = 4096
#: Elements of one [tokens x hidden] tile on a GPU; the token count per program follows from it.
TILE_ELEMENTS = 8192
#: The interpreter pays per program instance, so it gets larger tiles.
TILE_ELEMENTS_INTERPRETER = 32768
#: Gradient elements one program of the backward scale kernel handles.
SCALE_BLOCK = 4096

try:  # triton is optional: without it every tensor takes the plain-torch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - only where triton is absent
    triton = None

if triton is not None:

    @triton.jit
    def _select(values, index, COUNT: tl.constexpr):
        """``values[index]`` for a tuple and a runtime index: a chain of selects, so the result keeps
        its type (a pointer its element type and the alignment the launcher proved for every entry)."""
        out = values[0]
        for p in tl.static_range(1, COUNT):
            out = tl.where(index == p, values[p], out)
        return out

    @triton.jit
    def _tile_offsets(tokens, token_ok, stride, col0, hidden, BLOCK: tl.constexpr, MASK_H: tl.constexpr):
        """Offsets and mask of the [tokens x BLOCK] tile whose first column is ``col0``."""
        cols = col0 + tl.arange(0, BLOCK)
        offsets = tokens[:, None] * stride + cols[None, :]
        if MASK_H:
            ok = token_ok[:, None] & (cols < hidden)[None, :]
        else:  # the tiles cover every pair's hidden size exactly: only the token bound remains
            ok = token_ok[:, None] & (cols < BLOCK + col0)[None, :]
        return offsets, ok

    @triton.jit
    def _pair_stats(s, t, USE_MSE: tl.constexpr, USE_COSINE: tl.constexpr):
        """Per-token sums over one hidden slice: ||s - t||^2, s.t, ||s||^2, ||t||^2 (0 where unused)."""
        if USE_MSE:
            squared_error = tl.sum((s - t) * (s - t), axis=1)
        else:
            squared_error = tl.sum(s * 0, axis=1)
        if USE_COSINE:
            dot = tl.sum(s * t, axis=1)
            s_sq = tl.sum(s * s, axis=1)
            t_sq = tl.sum(t * t, axis=1)
        else:
            dot = squared_error * 0
            s_sq = squared_error * 0
            t_sq = squared_error * 0
        return squared_error, dot, s_sq, t_sq

    @triton.jit
    def _align_loss_kernel(
        student, teacher, grad,                # tuples of PAIRS typed pointers; grad contiguous [N, L, H_p]
        s_row_stride, s_token_stride,          # tuples of PAIRS ints (elements); the hidden stride is 1
        t_row_stride, t_token_stride,
        hidden,                                # tuple of PAIRS ints: H_p
        mse_coef, cos_coef,                    # tuples of PAIRS floats: w_p * mse_weight, w_p * cosine_weight
        mask_ptr, mask_row_stride, mask_token_stride,  # [N, L] attention mask (unread without one)
        partial_ptr,                           # acc dtype [N, PAIRS, token_blocks]: partial l_i
        N, L, token_blocks,
        PAIRS: tl.constexpr, HAS_MASK: tl.constexpr, MEAN: tl.constexpr, USE_MSE: tl.constexpr,
        USE_COSINE: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
        BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr, H_CHUNKS: tl.constexpr, BLOCK_T: tl.constexpr,
        MASK_H: tl.constexpr, COUNT_BLOCK: tl.constexpr, VEC: tl.constexpr, WIDE: tl.constexpr,
        EPS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pair = tl.program_id(1)
        row = (pid // token_blocks).to(tl.int64)
        block = pid % token_blocks
        acc = partial_ptr.dtype.element_ty

        s_ptr = _select(student, pair, PAIRS)
        t_ptr = _select(teacher, pair, PAIRS)
        g_ptr = _select(grad, pair, PAIRS)
        s_row = _select(s_row_stride, pair, PAIRS)
        s_tok = _select(s_token_stride, pair, PAIRS)
        t_row = _select(t_row_stride, pair, PAIRS)
        t_tok = _select(t_token_stride, pair, PAIRS)
        h = _select(hidden, pair, PAIRS)
        mse_w = _select(mse_coef, pair, PAIRS)
        cos_w = _select(cos_coef, pair, PAIRS)
        if VEC > 1:
            # Every stride and hidden size is a multiple of VEC elements (checked on the host), so a
            # token's hidden slice starts on a 16-byte boundary: the loads and stores are vectors.
            s_row = tl.multiple_of(s_row, VEC)
            s_tok = tl.multiple_of(s_tok, VEC)
            t_row = tl.multiple_of(t_row, VEC)
            t_tok = tl.multiple_of(t_tok, VEC)
            h = tl.multiple_of(h, VEC)
        s_ptr += row * s_row
        t_ptr += row * t_row
        g_ptr += row * L * h

        tokens = block * BLOCK_L + tl.arange(0, BLOCK_L)
        token_ok = tokens < L
        if WIDE:  # a row spans 2**31 elements or more
            tokens = tokens.to(tl.int64)
        # 1 / |V_i| (0 for a row without a valid token); the row's mask is short and read from L2.
        if HAS_MASK:
            m_row = mask_ptr + row * mask_row_stride
            count = L * 0
            for start in range(0, L, COUNT_BLOCK):
                idx = start + tl.arange(0, COUNT_BLOCK)
                m = tl.load(m_row + idx * mask_token_stride, mask=idx < L, other=0)
                count += tl.sum((m != 0).to(tl.int32), axis=0)
            valid = tl.load(m_row + tokens * mask_token_stride, mask=token_ok, other=0) != 0
        else:
            count = L
            valid = token_ok
        row_scale = tl.where(count > 0, 1.0 / tl.maximum(count, 1).to(acc), 0.0)
        token_weight = tl.where(valid, row_scale, 0.0)
        grad_weight = token_weight / N if MEAN else token_weight  # the 1/N of reduction "mean"
        mse_factor = 2.0 * mse_w * grad_weight / h

        if H_CHUNKS == 1:
            # The whole hidden slice is held in registers: s and t are read once.
            s_off, ok = _tile_offsets(tokens, token_ok, s_tok, 0, h, BLOCK_H, MASK_H)
            t_off, _ = _tile_offsets(tokens, token_ok, t_tok, 0, h, BLOCK_H, MASK_H)
            s = tl.load(s_ptr + s_off, mask=ok, other=0.0).to(acc)
            t = tl.load(t_ptr + t_off, mask=ok, other=0.0).to(acc)
            squared_error, dot, s_sq, t_sq = _pair_stats(s, t, USE_MSE, USE_COSINE)
        else:
            squared_error = tl.zeros([BLOCK_L], dtype=acc)
            dot = tl.zeros([BLOCK_L], dtype=acc)
            s_sq = tl.zeros([BLOCK_L], dtype=acc)
            t_sq = tl.zeros([BLOCK_L], dtype=acc)
            for chunk in range(H_CHUNKS):
                s_off, ok = _tile_offsets(tokens, token_ok, s_tok, chunk * BLOCK_H, h, BLOCK_H, MASK_H)
                t_off, _ = _tile_offsets(tokens, token_ok, t_tok, chunk * BLOCK_H, h, BLOCK_H, MASK_H)
                s = tl.load(s_ptr + s_off, mask=ok, other=0.0).to(acc)
                t = tl.load(t_ptr + t_off, mask=ok, other=0.0).to(acc)
                se, d, ss, tt = _pair_stats(s, t, USE_MSE, USE_COSINE)
                squared_error += se
                dot += d
                s_sq += ss
                t_sq += tt
                if COMPUTE_GRAD and not USE_COSINE:
                    # The MSE gradient needs no per-token statistic: write it in this same pass.
                    g_off, _ = _tile_offsets(tokens, token_ok, h, chunk * BLOCK_H, h, BLOCK_H, MASK_H)
                    tl.store(g_ptr + g_off, (mse_factor[:, None] * (s - t)).to(g_ptr.dtype.element_ty), mask=ok)
        if BLOCK_T > 0:
            # The rest of the hidden slice (768 = 512 + 256), also held in registers.
            s_off_t, ok_t = _tile_offsets(tokens, token_ok, s_tok, H_CHUNKS * BLOCK_H, h, BLOCK_T, MASK_H)
            t_off_t, _ = _tile_offsets(tokens, token_ok, t_tok, H_CHUNKS * BLOCK_H, h, BLOCK_T, MASK_H)
            s_t = tl.load(s_ptr + s_off_t, mask=ok_t, other=0.0).to(acc)
            t_t = tl.load(t_ptr + t_off_t, mask=ok_t, other=0.0).to(acc)
            se, d, ss, tt = _pair_stats(s_t, t_t, USE_MSE, USE_COSINE)
            squared_error += se
            dot += d
            s_sq += ss
            t_sq += tt

        loss = squared_error * (mse_w / h)
        # gradient = s_factor * s + t_factor * t per token (MSE: 2c(s - t); cosine: see the docstring)
        s_factor = mse_factor
        t_factor = -mse_factor
        if USE_COSINE:
            s_norm = tl.sqrt(s_sq)
            s_norm_clamped = tl.maximum(s_norm, EPS)
            t_norm_clamped = tl.maximum(tl.sqrt(t_sq), EPS)
            cosine = dot / (s_norm_clamped * t_norm_clamped)
            loss += cos_w * (1.0 - cosine)
            t_factor -= cos_w * grad_weight / (s_norm_clamped * t_norm_clamped)
            s_factor += tl.where(s_norm > EPS, cos_w * grad_weight * cosine / (s_norm_clamped * s_norm_clamped), 0.0)
        tl.store(partial_ptr + (row * PAIRS + pair) * token_blocks + block, tl.sum(loss * token_weight, axis=0))

        if COMPUTE_GRAD:
            dtype = g_ptr.dtype.element_ty
            if H_CHUNKS == 1:
                g_off, _ = _tile_offsets(tokens, token_ok, h, 0, h, BLOCK_H, MASK_H)
                tl.store(g_ptr + g_off, (s_factor[:, None] * s + t_factor[:, None] * t).to(dtype), mask=ok)
            elif USE_COSINE:
                # Second pass over the chunks (from L2): the factors needed the whole slice.
                for chunk in range(H_CHUNKS):
                    s_off, ok = _tile_offsets(tokens, token_ok, s_tok, chunk * BLOCK_H, h, BLOCK_H, MASK_H)
                    t_off, _ = _tile_offsets(tokens, token_ok, t_tok, chunk * BLOCK_H, h, BLOCK_H, MASK_H)
                    g_off, _ = _tile_offsets(tokens, token_ok, h, chunk * BLOCK_H, h, BLOCK_H, MASK_H)
                    s = tl.load(s_ptr + s_off, mask=ok, other=0.0).to(acc)
                    t = tl.load(t_ptr + t_off, mask=ok, other=0.0).to(acc)
                    tl.store(g_ptr + g_off, (s_factor[:, None] * s + t_factor[:, None] * t).to(dtype), mask=ok)
            if BLOCK_T > 0:
                g_off_t, _ = _tile_offsets(tokens, token_ok, h, H_CHUNKS * BLOCK_H, h, BLOCK_T, MASK_H)
                tl.store(g_ptr + g_off_t, (s_factor[:, None] * s_t + t_factor[:, None] * t_t).to(dtype), mask=ok_t)

    @triton.jit
    def _scale_kernel(grad, row_elements, chunks, scale_ptr, scale_stride, PAIRS: tl.constexpr, BLOCK: tl.constexpr):
        """grad[p][row] *= scale[row * scale_stride] in place, in the scale's precision (stride 0: one
        scale for all rows). Reads the scale on the device and does nothing where it is 1, so the
        usual backward moves no data."""
        pid = tl.program_id(0)
        pair = tl.program_id(1)
        row = (pid // chunks).to(tl.int64)
        chunk = pid % chunks
        scale = tl.load(scale_ptr + row * scale_stride)
        n = _select(row_elements, pair, PAIRS)
        if (scale != 1.0) & (chunk * BLOCK < n):
            g_ptr = _select(grad, pair, PAIRS) + row * n
            offsets = chunk * BLOCK + tl.arange(0, BLOCK)
            ok = offsets < n
            g = tl.load(g_ptr + offsets, mask=ok, other=0.0)
            tl.store(g_ptr + offsets, (g.to(scale.dtype) * scale).to(g.dtype), mask=ok)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _power_of_two_at_most(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def _next_power_of_two(x: int) -> int:
    return 1 << (max(1, x) - 1).bit_length()


@dataclass(frozen=True)
class _Tiles:
    block_l: int
    block_h: int   # main hidden tile
    h_chunks: int  # main tiles per hidden slice (more than one: walked in a loop)
    block_t: int   # tail tile after the main tiles (0: none)
    mask_h: bool   # some pair's H is not exactly h_chunks * block_h + block_t
    vec: int       # elements per 16 bytes that every stride and H is a multiple of
    num_warps: int


def _tiles(hidden: Sequence[int], length: int, strides: Sequence[int], itemsize: int, interpret: bool) -> _Tiles:
    """Tile shape for hidden sizes ``hidden``: power-of-two tiles that cover the widest H with the
    least waste (768 = 512 + 256: one tile of 512 and a tail of 256, both held in registers)."""
    widest = max(hidden)
    if widest <= MAX_BLOCK_H:
        block_h, h_chunks = _power_of_two_at_most(widest), 1
    else:
        block_h, h_chunks = MAX_BLOCK_H, widest // MAX_BLOCK_H
    rest = widest - h_chunks * block_h
    block_t = _next_power_of_two(rest) if rest else 0
    mask_h = any(h != h_chunks * block_h + block_t for h in hidden)
    budget = TILE_ELEMENTS_INTERPRETER if interpret else TILE_ELEMENTS
    block_l = max(1, min(_next_power_of_two(length), _power_of_two_at_most(budget // (block_h + block_t))))
    vec = 16 // itemsize
    while vec > 1 and any(x % vec for x in (*hidden, *strides)):
        vec //= 2
    # enough warps that each thread holds at least one 16-byte vector of the main tile
    num_warps = max(1, min(8, _power_of_two_at_most(block_l * block_h // (32 * (16 // itemsize)))))
    return _Tiles(block_l, block_h, h_chunks, block_t, mask_h, vec, num_warps)


@dataclass(frozen=True)
class _Settings:
    reduction: str
    use_mse: bool
    use_cosine: bool
    compute_grad: bool
    triton: bool
    mse_coef: tuple   # w_p * mse_weight per pair
    cos_coef: tuple   # w_p * cosine_weight per pair


def _launch(settings: _Settings, student, teacher, mask):
    pairs = len(student)
    n, length = student[0].shape[:2]
    device, dtype = student[0].device, student[0].dtype
    acc = _accumulate_dtype(dtype)
    hidden = tuple(s.shape[2] for s in student)
    strides = [x for s, t in zip(student, teacher) for x in (s.stride(0), s.stride(1), t.stride(0), t.stride(1))]
    tiles = _tiles(hidden, length, strides, student[0].element_size(), interpreter_enabled())
    token_blocks = triton.cdiv(length, tiles.block_l)
    # tokens x token stride is 32-bit arithmetic in the kernel unless a row spans 2**31 elements
    widest_row = length * max([*hidden, *(x.stride(1) for x in (*student, *teacher))])

    grads = tuple(torch.empty(s.shape, dtype=dtype, device=device) for s in student) if settings.compute_grad else None
    partial = torch.empty(n, pairs, token_blocks, dtype=acc, device=device)
    if mask is None:
        mask_args = (partial, 0, 0)
    else:
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask  # one byte each either way
        mask_args = (mask, mask.stride(0), mask.stride(1))
    _align_loss_kernel[(n * token_blocks, pairs)](
        tuple(student), tuple(teacher), grads if grads is not None else tuple(student),
        tuple(s.stride(0) for s in student), tuple(s.stride(1) for s in student),
        tuple(t.stride(0) for t in teacher), tuple(t.stride(1) for t in teacher),
        hidden, settings.mse_coef, settings.cos_coef,
        *mask_args, partial, n, length, token_blocks,
        PAIRS=pairs, HAS_MASK=mask is not None, MEAN=settings.reduction == "mean", USE_MSE=settings.use_mse,
        USE_COSINE=settings.use_cosine, COMPUTE_GRAD=settings.compute_grad,
        BLOCK_L=tiles.block_l, BLOCK_H=tiles.block_h, H_CHUNKS=tiles.h_chunks, BLOCK_T=tiles.block_t,
        MASK_H=tiles.mask_h, COUNT_BLOCK=min(_next_power_of_two(length), 1024), VEC=tiles.vec,
        WIDE=widest_row >= 2**31, EPS=EPS, num_warps=tiles.num_warps,
    )
    return partial.sum(dim=(1, 2)), grads


def _scale_in_place(grads, scale, per_row: bool) -> None:
    """``g *= scale`` (per row of g for reduction "none") on the device, without reading the scale on
    the host; the kernel skips the data where the scale is 1."""
    n, length = grads[0].shape[:2]
    row_elements = tuple(length * g.shape[2] for g in grads)
    chunks = triton.cdiv(max(row_elements), SCALE_BLOCK)
    _scale_kernel[(n * chunks, len(grads))](tuple(grads), row_elements, chunks, scale,
                                             scale.stride(0) if per_row else 0,
                                             PAIRS=len(grads), BLOCK=SCALE_BLOCK, num_warps=4)


def _torch_path(settings: _Settings, student, teacher, mask):
    """The same computation in plain torch, one pair at a time, without the autograd graph of the
    naive composition: the gradient is written into the difference buffer in place."""
    acc = _accumulate_dtype(student[0].dtype)
    n, length = student[0].shape[:2]
    if mask is None:
        token_weight = torch.full((n, length), 1.0 / length, dtype=acc, device=student[0].device)
    else:
        valid = (mask != 0).to(acc)
        counts = valid.sum(dim=1, keepdim=True)
        token_weight = valid * torch.where(counts > 0, 1.0 / counts.clamp_min(1), 0.0)
    grad_weight = token_weight / n if settings.reduction == "mean" else token_weight
    per_example = torch.zeros(n, dtype=acc, device=student[0].device)
    grads = [] if settings.compute_grad else None
    for mse_w, cos_w, s, t in zip(settings.mse_coef, settings.cos_coef, student, teacher):
        mse_coef = mse_w / s.shape[2]
        s_acc, t_acc = s.to(acc), t.to(acc)
        token_loss = torch.zeros_like(token_weight)
        if settings.use_mse:
            diff = s_acc - t_acc
            token_loss = torch.linalg.vector_norm(diff, dim=-1).square_().mul_(mse_coef)
        if settings.use_cosine:
            s_norm = torch.linalg.vector_norm(s_acc, dim=-1)
            s_norm_clamped = s_norm.clamp_min(EPS)
            t_norm_clamped = torch.linalg.vector_norm(t_acc, dim=-1).clamp_min_(EPS)
            norm_product = s_norm_clamped * t_norm_clamped
            cosine = torch.einsum("nlh,nlh->nl", s_acc, t_acc).div_(norm_product)
            token_loss = token_loss + cos_w * (1.0 - cosine)
        per_example += (token_loss * token_weight).sum(dim=1)
        if not settings.compute_grad:
            continue
        grad = diff.mul_((2.0 * mse_coef * grad_weight).unsqueeze(-1)) if settings.use_mse else torch.zeros_like(s_acc)
        if settings.use_cosine:
            t_factor = -cos_w * grad_weight / norm_product
            s_factor = torch.where(s_norm > EPS, cos_w * grad_weight * cosine / s_norm_clamped.square(), 0.0)
            grad.addcmul_(t_acc, t_factor.unsqueeze(-1)).addcmul_(s_acc, s_factor.unsqueeze(-1))
        grads.append(grad.to(s.dtype))
    return per_example, grads


def _run(student, teacher, mask, mse_coef, cos_coef, use_mse, use_cosine, reduction, compute_grad, triton_path):
    settings = _Settings(reduction, use_mse, use_cosine, compute_grad, triton_path, tuple(mse_coef), tuple(cos_coef))
    return (_launch if triton_path else _torch_path)(settings, student, teacher, mask)


@torch.library.custom_op("sage_fast::align_loss", mutates_args=())
def _align_loss_op(student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor | None,
                   mse_coef: list[float], cos_coef: list[float], use_mse: bool, use_cosine: bool, reduction: str,
                   compute_grad: bool, triton_path: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(loss, per-example loss, the gradient of the loss for each student state, unscaled; empty
    without ``compute_grad``). One opaque op, so that ``torch.compile`` records a call instead of
    tracing into the kernel launch (or Triton's interpreter): a compiled step keeps the Triton path
    whole, and its backward is the in-place scale below."""
    per_example, grads = _run(student, teacher, mask, mse_coef, cos_coef, use_mse, use_cosine, reduction,
                              compute_grad, triton_path)
    if reduction == "none":
        loss = per_example.clone()  # outputs of an op must not alias each other
    else:
        loss = per_example.sum() / (per_example.shape[0] if reduction == "mean" else 1)
    return loss, per_example, list(grads) if grads is not None else []


@_align_loss_op.register_fake
def _(student, teacher, mask, mse_coef, cos_coef, use_mse, use_cosine, reduction, compute_grad, triton_path):
    first = student[0]
    per_example = first.new_empty(first.shape[0], dtype=_accumulate_dtype(first.dtype))
    loss = per_example.new_empty(per_example.shape if reduction == "none" else ())
    return loss, per_example, [torch.empty_like(s, memory_format=torch.contiguous_format) for s in student] \
        if compute_grad else []


@torch.library.custom_op("sage_fast::align_loss_scale_grads_", mutates_args=("grads",))
def _scale_grads_(grads: list[torch.Tensor], scale: torch.Tensor, per_row: bool, triton_path: bool) -> None:
    """``grads *= scale`` in place (per example for reduction "none"); on the Triton path without a
    pass over the data where the scale is 1."""
    if triton_path:
        _scale_in_place(grads, scale, per_row)
    else:
        scale = scale[:, None, None] if per_row else scale
        for g in grads:
            g.mul_(scale)


def _setup_context(ctx, inputs, output):
    student, teacher, mask, mse_coef, cos_coef, use_mse, use_cosine, reduction, compute_grad, triton_path = inputs
    _, per_example, grads = output
    ctx.args = (len(student), mse_coef, cos_coef, use_mse, use_cosine, reduction, triton_path)
    # The gradients are held as a plain attribute, not saved: backward scales them in place and hands
    # them over (autograd can then take them as .grad without a copy). They are marked
    # non-differentiable, so they hold no reference back to this node. The inputs are saved
    # (references, no copies) for a further backward through a graph kept with retain_graph=True.
    ctx.mark_non_differentiable(per_example, *grads)
    ctx.grads = grads if compute_grad else None
    if compute_grad:
        ctx.save_for_backward(*student, *teacher, mask)


def _backward(ctx, grad_loss, _grad_per_example, _grad_grads):
    pairs, mse_coef, cos_coef, use_mse, use_cosine, reduction, triton_path = ctx.args
    grads, ctx.grads = ctx.grads, None
    if grads is None:
        # The first backward took the stored gradient (it is usually the only one); a graph kept with
        # retain_graph=True recomputes it for each further backward.
        saved = ctx.saved_tensors
        _, grads = _run(saved[:pairs], saved[pairs:2 * pairs], saved[2 * pairs], mse_coef, cos_coef, use_mse,
                        use_cosine, reduction, True, triton_path)
        grads = list(grads)
    _scale_grads_(grads, grad_loss, reduction == "none", triton_path)
    return grads, [None] * pairs, None, None, None, None, None, None, None, None


_align_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _check_layers(name: str, value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list or tuple of [N, L, H] tensors (one per layer pair), "
                         f"got {type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"{name} is empty; pass at least one [N, L, H] tensor")
    return [_checks.tensor(f"{name}[{p}]", v, ndim=3, dtypes=_checks.FLOAT_DTYPES) for p, v in enumerate(value)]


def _check_weight(name: str, value) -> float:
    value = _checks.in_range(name, value, 0.0, float("inf"))
    if value == float("inf"):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_inputs(student_hidden, teacher_hidden, attention_mask, mse_weight, cosine_weight, layer_weights,
                  reduction):
    student = _check_layers("student_hidden", student_hidden)
    teacher = _check_layers("teacher_hidden", teacher_hidden)
    if len(student) != len(teacher):
        raise ValueError(f"student_hidden and teacher_hidden must hold the same number of layers, "
                         f"got {len(student)} and {len(teacher)}")
    first = student[0]
    for p, (s, t) in enumerate(zip(student, teacher)):
        _checks.same_shape(f"student_hidden[{p}]", s, f"teacher_hidden[{p}]", t)
        _checks.same_dtype(f"student_hidden[{p}]", s, f"teacher_hidden[{p}]", t)
        _checks.same_dtype("student_hidden[0]", first, f"student_hidden[{p}]", s)
        _checks.same_device("student_hidden[0]", first, f"student_hidden[{p}]", s)
        _checks.same_device(f"student_hidden[{p}]", s, f"teacher_hidden[{p}]", t)
        if s.shape[:2] != first.shape[:2]:
            raise ValueError(f"every layer pair must share N and L (one batch): student_hidden[0] has "
                             f"{tuple(first.shape[:2])}, student_hidden[{p}] has {tuple(s.shape[:2])}")
        for dim, what in enumerate(("batch (N)", "sequence (L)", "hidden (H)")):
            if s.shape[dim] == 0:
                raise ValueError(f"student_hidden[{p}] has an empty {what} dimension, shape {tuple(s.shape)}")
    if attention_mask is not None:
        _checks.tensor("attention_mask", attention_mask, ndim=2)
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise ValueError(f"attention_mask must have a bool or integer dtype (1 = valid token), "
                             f"got {str(attention_mask.dtype).replace('torch.', '')}")
        if attention_mask.shape != first.shape[:2]:
            raise ValueError(f"attention_mask must have shape [N, L] = {tuple(first.shape[:2])}, "
                             f"got {tuple(attention_mask.shape)}")
        _checks.same_device("attention_mask", attention_mask, "student_hidden[0]", first)
        # A value check needs the mask on the host: free on CPU, a device sync on CUDA (opt-in there),
        # a graph split under torch.compile (left out there).
        if (attention_mask.dtype != torch.bool and _checks.values_checked(attention_mask)
                and not torch.compiler.is_compiling()):
            if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
                raise ValueError("attention_mask has values other than 0 and 1; pass a bool or 0/1 integer "
                                 "attention mask")
    mse_weight = _check_weight("mse_weight", mse_weight)
    cosine_weight = _check_weight("cosine_weight", cosine_weight)
    if mse_weight == 0 and cosine_weight == 0:
        raise ValueError("mse_weight and cosine_weight are both 0; at least one must be positive")
    if layer_weights is None:
        layer_weights = [1.0] * len(student)
    else:
        if isinstance(layer_weights, torch.Tensor):
            layer_weights = layer_weights.tolist()
        if not isinstance(layer_weights, Sequence) or len(layer_weights) != len(student):
            raise ValueError(f"layer_weights must be a sequence of {len(student)} numbers (one per layer pair), "
                             f"got {layer_weights!r}")
        layer_weights = [_check_weight(f"layer_weights[{p}]", w) for p, w in enumerate(layer_weights)]
    _checks.choice("reduction", reduction, REDUCTIONS)
    return student, teacher, mse_weight, cosine_weight, layer_weights


def align_loss(student_hidden, teacher_hidden, attention_mask=None, *, mse_weight=1.0, cosine_weight=0.0,
               layer_weights=None, reduction="mean", return_per_example=False):
    """Mask-aware MSE and/or cosine alignment of student and teacher hidden states, summed over layer
    pairs (see the module docstring for the math).

    ``student_hidden`` and ``teacher_hidden`` are equal-length sequences of ``[N, L, H_p]`` tensors
    (the student's already projected to the teacher's size). Returns the loss reduced over examples
    (``"mean"``, ``"sum"``, or ``"none"`` for ``[N]``), and with ``return_per_example=True`` also the
    detached float32 ``[N]`` vector ``l``. Gradients reach ``student_hidden`` only.
    """
    student, teacher, mse_weight, cosine_weight, layer_weights = _check_inputs(
        student_hidden, teacher_hidden, attention_mask, mse_weight, cosine_weight, layer_weights, reduction)
    compute_grad = torch.is_grad_enabled() and any(s.requires_grad for s in student)
    triton_path = use_triton(student[0].device)
    if triton_path:
        # The kernel reads the hidden dimension at unit stride (16-byte vectors): other layouts are
        # copied once here (hidden states of Hugging Face models already have it).
        student = [s if s.stride(2) == 1 or s.shape[2] == 1 else s.contiguous() for s in student]
        teacher = [t if t.stride(2) == 1 or t.shape[2] == 1 else t.contiguous() for t in teacher]
    loss, per_example, _ = _align_loss_op(student, [t.detach() for t in teacher], attention_mask,
                                          [float(w * mse_weight) for w in layer_weights],
                                          [float(w * cosine_weight) for w in layer_weights],
                                          mse_weight > 0, cosine_weight > 0, reduction, compute_grad, triton_path)
    if return_per_example:
        return loss, per_example.detach().to(torch.float32)
    return loss


def align_loss_reference(student_hidden, teacher_hidden, attention_mask=None, *, mse_weight=1.0,
                         cosine_weight=0.0, layer_weights=None, reduction="mean"):
    """Plain float64 composition of the definition, differentiable by autograd; for tests."""
    n, length = student_hidden[0].shape[:2]
    valid = (torch.ones(n, length, dtype=torch.float64, device=student_hidden[0].device) if attention_mask is None
             else (attention_mask == 1).to(torch.float64))
    counts = valid.sum(dim=1)
    weights = [1.0] * len(student_hidden) if layer_weights is None else list(layer_weights)
    per_example = torch.zeros(n, dtype=torch.float64, device=valid.device)
    for w, s, t in zip(weights, student_hidden, teacher_hidden):
        s, t = s.to(torch.float64), t.detach().to(torch.float64)
        token = mse_weight * ((s - t) ** 2).mean(dim=-1)
        if cosine_weight:
            norms = s.norm(dim=-1).clamp(min=EPS) * t.norm(dim=-1).clamp(min=EPS)
            token = token + cosine_weight * (1 - (s * t).sum(dim=-1) / norms)
        per_example = per_example + w * torch.where(counts > 0, (token * valid).sum(dim=1) / counts.clamp(min=1), 0.0)
    if reduction == "none":
        return per_example
    return per_example.sum() / (n if reduction == "mean" else 1)
