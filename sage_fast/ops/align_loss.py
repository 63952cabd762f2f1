"""Hidden-state alignment loss over several layer pairs, fused into one kernel launch.

For layer pairs ``p = 1..P`` with student states ``s_p`` and teacher states ``t_p`` of shape
``[N, L, H_p]`` and valid tokens ``V_i = {l : mask[i, l] == 1}``, the loss of example ``i`` is

    l_i = sum_p w_p * ( mse_weight    / (|V_i| H_p) * sum_{l in V_i} ||s_pil - t_pil||^2
                      + cosine_weight / |V_i|       * sum_{l in V_i} (1 - cos(s_pil, t_pil)) )

with ``cos(s, t) = s.t / (max(||s||, eps) max(||t||, eps))``, ``eps = 1e-8`` (as torch clamps
norms); an example with no valid token has ``l_i = 0``. The gradient with respect to ``s`` is

    d l_i / d s = w_p * valid / |V_i| * ( mse_weight * 2 (s - t) / H_p
                  - cosine_weight * ( t / (max(||s||, eps) max(||t||, eps)) - [||s|| > eps] cos s / ||s||^2 ) )

Gradients flow to the student states only: the teacher is a constant. The forward pass writes
this gradient (in the student dtype) next to the loss, so the backward pass is only a scale.

One launch covers every pair: the kernel reads each pair's base address and strides from small
device tables and casts the address to a typed pointer, so pairs need not be stacked (a copy).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _checks
from .._backend import use_triton

__all__ = ["align_loss", "align_loss_reference"]

EPS = 1e-8
REDUCTIONS = ("mean", "sum", "none")
#: Widest hidden slice one program holds; wider states are walked in chunks of this size.
MAX_BLOCK_H = 4096
#: Elements of one [tokens x hidden] tile; the token count per program follows from it.
TILE_ELEMENTS = 8192


try:  # without triton every tensor takes the plain-torch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - only where triton is absent
    triton = None

if triton is not None:

    @triton.jit
    def _pair_stats(s, t, USE_MSE: tl.constexpr, USE_COSINE: tl.constexpr):
        """Per-token sums over one hidden slice: ||s - t||^2, s.t, ||s||^2, ||t||^2."""
        squared_error = tl.sum((s - t) * (s - t), axis=1) if USE_MSE else tl.sum(s * 0, axis=1)
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
        pair_table,                            # int64 [P, 10]: per pair, see _pair_table
        coefficients,                          # acc dtype [P, 2]: (w_p mse_weight / H_p, w_p cosine_weight)
        row_scale,                             # acc dtype [N]: 1 / |V_i|, 0 when no token is valid
        grad_row_scale,                        # acc dtype [N]: row_scale, times 1/N for reduction "mean"
        valid_ptr,                             # uint8 [N, L] (unread without a mask)
        grad_ptr,                              # student dtype, flat: every pair's [N, L, H_p] gradient
        partial_ptr,                           # acc dtype [N, P, token blocks]: partial l_i
        L, token_blocks,
        HAS_MASK: tl.constexpr, USE_MSE: tl.constexpr, USE_COSINE: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
        BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr, H_CHUNKS: tl.constexpr, EPS: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        pair = tl.program_id(1).to(tl.int64)
        pairs = tl.num_programs(1)
        row = pid // token_blocks
        block = pid % token_blocks
        dtype = grad_ptr.dtype.element_ty
        acc = row_scale.dtype.element_ty

        entry = pair_table + 10 * pair
        student = tl.load(entry).to(tl.pointer_type(dtype))
        teacher = tl.load(entry + 1).to(tl.pointer_type(dtype))
        hidden = tl.load(entry + 8)
        mse_coef = tl.load(coefficients + 2 * pair)
        cos_coef = tl.load(coefficients + 2 * pair + 1)

        tokens = block * BLOCK_L + tl.arange(0, BLOCK_L)
        token_ok = tokens < L
        token_weight = tl.where(token_ok, tl.load(row_scale + row), 0.0).to(acc)
        grad_weight = tl.where(token_ok, tl.load(grad_row_scale + row), 0.0).to(acc)
        if HAS_MASK:
            valid = tl.load(valid_ptr + row * L + tokens, mask=token_ok, other=0) != 0
            token_weight = tl.where(valid, token_weight, 0.0)
            grad_weight = tl.where(valid, grad_weight, 0.0)

        s_row = student + row * tl.load(entry + 2) + tokens[:, None] * tl.load(entry + 3)
        t_row = teacher + row * tl.load(entry + 5) + tokens[:, None] * tl.load(entry + 6)
        s_step = tl.load(entry + 4)
        t_step = tl.load(entry + 7)
        g_row = grad_ptr + tl.load(entry + 9) + (row * L + tokens[:, None]) * hidden
        cols = tl.arange(0, BLOCK_H)

        if H_CHUNKS == 1:
            # The whole hidden vector fits one tile: read s and t once, write the gradient from registers.
            tile_ok = token_ok[:, None] & (cols[None, :] < hidden)
            s = tl.load(s_row + cols[None, :] * s_step, mask=tile_ok, other=0.0).to(acc)
            t = tl.load(t_row + cols[None, :] * t_step, mask=tile_ok, other=0.0).to(acc)
            squared_error, dot, s_sq, t_sq = _pair_stats(s, t, USE_MSE, USE_COSINE)
        else:
            squared_error = tl.zeros([BLOCK_L], dtype=acc)
            dot = tl.zeros([BLOCK_L], dtype=acc)
            s_sq = tl.zeros([BLOCK_L], dtype=acc)
            t_sq = tl.zeros([BLOCK_L], dtype=acc)
            for chunk in range(H_CHUNKS):
                c = chunk * BLOCK_H + cols
                chunk_ok = token_ok[:, None] & (c[None, :] < hidden)
                s = tl.load(s_row + c[None, :] * s_step, mask=chunk_ok, other=0.0).to(acc)
                t = tl.load(t_row + c[None, :] * t_step, mask=chunk_ok, other=0.0).to(acc)
                se, d, ss, tt = _pair_stats(s, t, USE_MSE, USE_COSINE)
                squared_error += se
                dot += d
                s_sq += ss
                t_sq += tt
                if COMPUTE_GRAD and not USE_COSINE:
                    # The MSE gradient needs no per-token statistic: write it in this same pass.
                    g = (2.0 * mse_coef * grad_weight)[:, None] * (s - t)
                    tl.store(g_row + c[None, :], g.to(dtype), mask=chunk_ok)

        loss = squared_error * mse_coef
        if USE_COSINE:
            s_norm = tl.sqrt(s_sq)
            s_norm_clamped = tl.maximum(s_norm, EPS)
            t_norm_clamped = tl.maximum(tl.sqrt(t_sq), EPS)
            cosine = dot / (s_norm_clamped * t_norm_clamped)
            loss += cos_coef * (1.0 - cosine)
            # d(1 - cos)/ds = -t / (|s| |t|) + cos s / |s|^2, the second term only where |s| is not clamped.
            t_factor = -cos_coef * grad_weight / (s_norm_clamped * t_norm_clamped)
            s_factor = tl.where(s_norm > EPS, cos_coef * grad_weight * cosine / (s_norm_clamped * s_norm_clamped), 0.0)
        tl.store(partial_ptr + (row * pairs + pair) * token_blocks + block, tl.sum(loss * token_weight, axis=0))

        if COMPUTE_GRAD:
            mse_factor = 2.0 * mse_coef * grad_weight
            if H_CHUNKS == 1:
                g = mse_factor[:, None] * (s - t) if USE_MSE else s * 0
                if USE_COSINE:
                    g += t_factor[:, None] * t + s_factor[:, None] * s
                tl.store(g_row + cols[None, :], g.to(dtype), mask=tile_ok)
            elif USE_COSINE:
                for chunk in range(H_CHUNKS):
                    c = chunk * BLOCK_H + cols
                    chunk_ok = token_ok[:, None] & (c[None, :] < hidden)
                    s = tl.load(s_row + c[None, :] * s_step, mask=chunk_ok, other=0.0).to(acc)
                    t = tl.load(t_row + c[None, :] * t_step, mask=chunk_ok, other=0.0).to(acc)
                    g = t_factor[:, None] * t + s_factor[:, None] * s
                    if USE_MSE:
                        g += mse_factor[:, None] * (s - t)
                    tl.store(g_row + c[None, :], g.to(dtype), mask=chunk_ok)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pair_table(student, teacher, grad_offsets, device):
    """One row per pair: student address, teacher address, student strides (3), teacher strides (3),
    hidden size, gradient offset. One host-to-device copy for all of them."""
    rows = [[s.data_ptr(), t.data_ptr(), *s.stride(), *t.stride(), s.shape[2], offset]
            for s, t, offset in zip(student, teacher, grad_offsets)]
    return torch.tensor(rows, dtype=torch.int64).to(device)


def _launch(student, teacher, valid, row_scale, grad_row_scale, coefficients, use_mse, use_cosine, compute_grad):
    pairs = len(student)
    n, length = student[0].shape[:2]
    device = student[0].device
    hidden = [s.shape[2] for s in student]
    block_h = min(triton.next_power_of_2(max(hidden)), MAX_BLOCK_H)
    h_chunks = triton.cdiv(max(hidden), block_h)
    block_l = max(1, min(triton.next_power_of_2(length), TILE_ELEMENTS // block_h))
    token_blocks = triton.cdiv(length, block_l)

    sizes = [n * length * h for h in hidden]
    offsets = [sum(sizes[:p]) for p in range(pairs)]
    grad_flat = torch.empty(sum(sizes) if compute_grad else 1, dtype=student[0].dtype, device=device)
    partial = torch.empty(n, pairs, token_blocks, dtype=row_scale.dtype, device=device)
    grid = (n * token_blocks, pairs)
    _align_loss_kernel[grid](
        _pair_table(student, teacher, offsets, device), coefficients, row_scale, grad_row_scale,
        valid if valid is not None else row_scale, grad_flat, partial,
        length, token_blocks,
        HAS_MASK=valid is not None, USE_MSE=use_mse, USE_COSINE=use_cosine, COMPUTE_GRAD=compute_grad,
        BLOCK_L=block_l, BLOCK_H=block_h, H_CHUNKS=h_chunks, EPS=EPS,
        num_warps=8 if block_l * block_h >= 4096 else 4,
    )
    per_example = partial.sum(dim=(1, 2))
    grads = None
    if compute_grad:
        grads = [grad_flat[o:o + size].view(n, length, h) for o, size, h in zip(offsets, sizes, hidden)]
    return per_example, grads


def _torch_path(student, teacher, valid, row_scale, grad_row_scale, coefficients, use_mse, use_cosine, compute_grad):
    """The same computation in plain torch, one pair at a time, without the autograd graph of the
    naive composition: the gradient is written into the difference buffer in place."""
    acc = row_scale.dtype
    token_weight = row_scale[:, None].expand(student[0].shape[:2])
    grad_weight = grad_row_scale[:, None].expand(student[0].shape[:2])
    if valid is not None:
        token_weight = token_weight * valid
        grad_weight = grad_weight * valid
    per_example = torch.zeros_like(row_scale)
    grads = [] if compute_grad else None
    for (mse_coef, cos_coef), s, t in zip(coefficients.tolist(), student, teacher):
        s_acc, t_acc = s.to(acc), t.to(acc)
        token_loss = torch.zeros_like(token_weight)
        if use_mse:
            diff = s_acc - t_acc
            token_loss = torch.linalg.vector_norm(diff, dim=-1).square_().mul_(mse_coef)
        if use_cosine:
            s_norm = torch.linalg.vector_norm(s_acc, dim=-1)
            s_norm_clamped = s_norm.clamp_min(EPS)
            t_norm_clamped = torch.linalg.vector_norm(t_acc, dim=-1).clamp_min_(EPS)
            norm_product = s_norm_clamped * t_norm_clamped
            cosine = torch.einsum("nlh,nlh->nl", s_acc, t_acc).div_(norm_product)
            token_loss = token_loss + cos_coef * (1.0 - cosine)
        per_example += (token_loss * token_weight).sum(dim=1)
        if not compute_grad:
            continue
        grad = diff.mul_((2.0 * mse_coef * grad_weight).unsqueeze(-1)) if use_mse else torch.zeros_like(s_acc)
        if use_cosine:
            t_factor = -cos_coef * grad_weight / norm_product
            s_factor = torch.where(s_norm > EPS, cos_coef * grad_weight * cosine / s_norm_clamped.square(), 0.0)
            grad.addcmul_(t_acc, t_factor.unsqueeze(-1)).addcmul_(s_acc, s_factor.unsqueeze(-1))
        grads.append(grad.to(s.dtype))
    return per_example, grads


class _AlignLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, settings, teacher, valid, row_scale, grad_row_scale, coefficients, *student):
        reduction, use_mse, use_cosine, compute_grad, triton_path = settings
        run = _launch if triton_path else _torch_path
        per_example, grads = run(list(student), list(teacher), valid, row_scale, grad_row_scale, coefficients,
                                 use_mse, use_cosine, compute_grad)
        ctx.reduction = reduction
        # Saved tensors are released as soon as backward returns, so autograd can take the stored
        # gradient as .grad without a copy.
        if grads is not None:
            ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(per_example)
        if reduction == "none":
            loss = per_example.clone()
        else:
            loss = per_example.sum() / (per_example.shape[0] if reduction == "mean" else 1)
        return loss, per_example

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_example):
        grads = ctx.saved_tensors
        if ctx.reduction == "none":
            scale = grad_loss.to(grads[0].dtype)[:, None, None]
            grads = [g * scale for g in grads]
        elif not torch.equal(grad_loss, torch.ones_like(grad_loss)):  # one host sync saves a full pass
            grads = [g * grad_loss.to(g.dtype) for g in grads]
        return (None,) * 6 + tuple(grads)


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
    first = student[0]
    device, acc = first.device, _accumulate_dtype(first.dtype)
    n = first.shape[0]

    valid = None
    if attention_mask is None:
        row_scale = torch.full((n,), 1.0 / first.shape[1], dtype=acc, device=device)
    else:
        valid = (attention_mask == 1).contiguous()
        counts = valid.sum(dim=1).to(acc)
        row_scale = torch.where(counts > 0, 1.0 / counts.clamp_min(1), 0.0)
        valid = valid.view(torch.uint8)
    grad_row_scale = row_scale / n if reduction == "mean" else row_scale
    coefficients = torch.tensor([[w * mse_weight / s.shape[2], w * cosine_weight]
                                 for w, s in zip(layer_weights, student)], dtype=acc).to(device)

    compute_grad = torch.is_grad_enabled() and any(s.requires_grad for s in student)
    triton_path = use_triton(device)
    if not triton_path and valid is not None:
        valid = valid.to(acc)
    settings = (reduction, mse_weight > 0, cosine_weight > 0, compute_grad, triton_path)
    teacher = tuple(t.detach() for t in teacher)
    loss, per_example = _AlignLossFunction.apply(settings, teacher, valid, row_scale, grad_row_scale, coefficients,
                                                 *student)
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
