"""Token-level distillation loss from hidden states and the output heads, without the logits.

For hidden states ``h`` (student) and ``k`` (teacher), head weights ``W`` and ``U`` and optional
biases ``b`` and ``c``, the loss is :func:`sage_fast.ops.kd_loss` of the logits
``s = h W^T + b`` and ``t = k U^T + c``, with every keyword meaning what it means there (the
divergence, ``temperature``, ``alpha``, ``ignore_index``, the reductions, ``num_items_in_batch``).

A language model's logits are ``[N, V]`` with N tokens and a vocabulary V of 32k to 256k: for 16k
tokens and a 128k vocabulary, one such matrix in bfloat16 is 4 GB, and the eager composition holds
several (both models' logits, their log-softmaxes, the gradient). Here the rows go through in
chunks, so neither model's full logits ever exist. Per chunk of rows::

    s_c = h_c W^T + b,   t_c = k_c U^T + c          (one GEMM each)
    l_c, g_c = kd_loss(s_c, t_c, y_c, reduction="sum"), with g_c = d l_c / d s_c stored by its forward
    grad_h[c] = g_c W,   grad_W += g_c^T h_c,   grad_b += sum of g_c's rows

so the gradient for the student's hidden states, head weight and bias is finished when the forward
pass ends, and backward only scales it by the incoming gradient. The chunk gradients are the
unscaled ones of a sum; the mean's ``1 / (rows that count)`` (or ``1 / num_items_in_batch``) is
applied once, to the small ``[N, H]``, ``[V, H]`` and ``[V]`` results, by a multiply with a device
tensor: counting the rows never makes the host wait for the device. Peak memory beyond the inputs
is the three ``[chunk, V]`` matrices and the ``[V, H]`` weight gradient.

Each chunk runs ``kd_loss`` as it runs on its own: on CUDA a cuBLAS GEMM per chunk and the fused
Triton loss kernel, on CPU the chunked plain-torch path. ``reduction="none"`` returns each row's
differentiable loss; its gradient depends on the incoming per-row weights, so backward recomputes
the chunks once more instead of storing anything ``[N, V]``-sized.

The teacher's hidden states, weight and bias are targets: no gradient flows to them.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import _checks
from .kd_loss import (DIVERGENCES, _check_num_items, _keep_graph, _labels_ok, _reduction_scale, kd_loss,
                      kd_loss_reference)

__all__ = ["fused_linear_kd_loss", "fused_linear_kd_loss_reference"]

REDUCTIONS = ("mean", "sum", "none", "batchmean")
#: Default chunk: as many rows as keep one chunk's logits near this many elements. On a GPU the
#: chunks are larger, so that the weight gradient (read and written once per chunk, ``[V, H]``)
#: moves few bytes next to the GEMMs' work; on the CPU smaller chunks keep the working set small.
CHUNK_ELEMENTS_CUDA = 1 << 27
CHUNK_ELEMENTS_CPU = 1 << 24
#: Fewer rows than this make the GEMMs too thin to run at speed, whatever the vocabulary.
MIN_CHUNK_ROWS = 16


def default_chunk_size(n_rows: int, vocab_size: int, device: torch.device) -> int:
    """Rows per chunk when none is given: a power of two with about ``CHUNK_ELEMENTS_*`` logits, at
    least ``MIN_CHUNK_ROWS``, at most the row count."""
    budget = CHUNK_ELEMENTS_CUDA if device.type == "cuda" else CHUNK_ELEMENTS_CPU
    rows = max(MIN_CHUNK_ROWS, budget // max(1, vocab_size))
    rows = 1 << (rows.bit_length() - 1)  # round down to a power of two
    return max(1, min(n_rows, rows))


def _logits(hidden, weight, bias):
    return torch.mm(hidden, weight.t()) if bias is None else torch.addmm(bias, hidden, weight.t())


def _chunk_loss(s, t, y, kd_kwargs, reduction):
    """kd_loss of one chunk of logits; ``(loss, per_row)``."""
    return kd_loss(s, t, y, reduction=reduction, return_per_example=True, **kd_kwargs)


class _FusedLinearKDLossFunction(torch.autograd.Function):
    """Returns ``(loss, per_row)``. For "mean" and "sum" the gradients are computed in forward,
    scaled there, and kept; backward multiplies them by the incoming gradient."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                labels, scale, chunk_size, kd_kwargs, reduction):
        n_rows = student_hidden.shape[0]
        needs = ctx.needs_input_grad
        compute_grad = reduction != "none" and any(needs[:3])
        grad_h = torch.empty_like(student_hidden) if compute_grad and needs[0] else None
        grad_w = torch.zeros_like(student_weight) if compute_grad and needs[1] else None
        grad_b = torch.zeros_like(student_bias) if compute_grad and student_bias is not None and needs[2] else None
        losses = []  # per-chunk sums ("mean", "sum") or per-row losses ("none")
        per_row = []
        for start in range(0, n_rows, chunk_size):
            stop = min(start + chunk_size, n_rows)
            h = student_hidden[start:stop]
            y = None if labels is None else labels[start:stop]
            t = _logits(teacher_hidden[start:stop], teacher_weight, teacher_bias)
            s = _logits(h, student_weight, student_bias)
            if not compute_grad:
                loss, rows = _chunk_loss(s, t, y, kd_kwargs, "none" if reduction == "none" else "sum")
                losses.append(loss)
                per_row.append(rows)
                continue
            s.requires_grad_(True)
            with torch.enable_grad():
                loss, rows = _chunk_loss(s, t, y, kd_kwargs, "sum")
                # kd_loss hands back the gradient its forward stored (a "sum" needs no scaling)
                (g,) = torch.autograd.grad(loss, s)
            del s, t
            losses.append(loss.detach())
            per_row.append(rows)
            _accumulate(g, h, student_weight, slice(start, stop), grad_h, grad_w, grad_b)
            del g
        per_row = torch.cat(per_row)
        ctx.mark_non_differentiable(per_row)
        ctx.reduction = reduction
        if reduction == "none":
            ctx.save_for_backward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                  teacher_bias, labels)
            ctx.chunk_size = chunk_size
            ctx.kd_kwargs = kd_kwargs
            return torch.cat(losses), per_row
        loss = torch.stack(losses).sum()
        if scale is not None:
            loss = loss * scale
        if compute_grad and scale is not None:
            for grad in (grad_h, grad_w, grad_b):
                if grad is not None:
                    # the scale stays in the loss's dtype: a half-precision copy of 1/count would
                    # put its own rounding error into every element
                    grad.mul_(scale)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return loss, per_row

    @staticmethod
    @once_differentiable  # the stored gradients are constants: a second derivative would be silently 0
    def backward(ctx, grad_loss, _grad_per_row):
        if ctx.reduction == "none":
            grads = _recompute_none(ctx, grad_loss)
        else:
            grads = tuple(_scaled(g, grad_loss) for g in ctx.saved_tensors)
        return (*grads, None, None, None, None, None, None, None, None)


def _accumulate(g, h, weight, rows, grad_h, grad_w, grad_b):
    """One chunk's share of the gradients, from ``g``, the loss's gradient for its logits: its rows of
    ``grad_h`` (g W), and its sums into ``grad_w`` (g^T h) and ``grad_b``; a ``None`` is not wanted."""
    if grad_h is not None:
        torch.mm(g, weight, out=grad_h[rows])
    if grad_w is not None:
        grad_w.addmm_(g.t(), h)
    if grad_b is not None:
        grad_b.add_(g.sum(dim=0))


def _scaled(grad, factor):
    if grad is None:
        return None
    if _keep_graph():
        # backward may run again: the stored gradient stays as it is
        return torch.mul(grad, factor, out=torch.empty_like(grad))
    # the usual loss.backward() passes 1: on the CPU reading it is free and skips a pass; on CUDA
    # the multiply runs on the device rather than the host waiting for the value
    if grad.device.type != "cpu" or float(factor) != 1.0:
        grad.mul_(factor)
    return grad


def _recompute_none(ctx, grad_rows):
    """Gradients of ``sum_i grad_rows[i] * l_i`` for reduction "none", chunk by chunk."""
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels = \
        ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_h = torch.empty_like(student_hidden) if needs[0] else None
    grad_w = torch.zeros_like(student_weight) if needs[1] else None
    grad_b = torch.zeros_like(student_bias) if student_bias is not None and needs[2] else None
    chunk_size = ctx.chunk_size
    for start in range(0, student_hidden.shape[0], chunk_size):
        stop = min(start + chunk_size, student_hidden.shape[0])
        h = student_hidden[start:stop]
        y = None if labels is None else labels[start:stop]
        with torch.no_grad():
            t = _logits(teacher_hidden[start:stop], teacher_weight, teacher_bias)
            s = _logits(h, student_weight, student_bias)
        s.requires_grad_(True)
        with torch.enable_grad():
            rows, _ = _chunk_loss(s, t, y, ctx.kd_kwargs, "none")
            (g,) = torch.autograd.grad(rows, s, grad_outputs=grad_rows[start:stop].to(rows.dtype))
        _accumulate(g, h, student_weight, slice(start, stop), grad_h, grad_w, grad_b)
    return grad_h, grad_w, grad_b


def _check(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias,
           chunk_size, temperature, alpha, divergence, beta, scale_by_t2, ignore_index, soft_label_index, reduction,
           num_items_in_batch):
    """Shape, dtype, device and scalar checks, all before any work."""
    for name, value in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden)):
        _checks.tensor(name, value, dtypes=_checks.FLOAT_DTYPES)
        if value.dim() < 1:
            raise ValueError(f"{name} must have at least 1 dimension ([..., hidden]), got a scalar")
    for name, value in (("student_weight", student_weight), ("teacher_weight", teacher_weight)):
        _checks.tensor(name, value, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    for side, hidden, weight in (("student", student_hidden, student_weight),
                                 ("teacher", teacher_hidden, teacher_weight)):
        if weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"{side}_weight must be [V, {hidden.shape[-1]}] to match {side}_hidden's hidden size "
                             f"{hidden.shape[-1]}, got width {weight.shape[1]} (shape {tuple(weight.shape)})")
        _checks.same_dtype(f"{side}_weight", weight, f"{side}_hidden", hidden)
        _checks.same_device(f"{side}_weight", weight, "student_hidden", student_hidden)
        _checks.same_device(f"{side}_hidden", hidden, "student_hidden", student_hidden)
    vocab = student_weight.shape[0]
    if teacher_weight.shape[0] != vocab:
        raise ValueError(f"teacher_weight has {teacher_weight.shape[0]} rows (vocabulary entries) but student_weight "
                         f"has {vocab}; the two heads must share the vocabulary")
    if vocab < 1:
        raise ValueError(f"student_weight must have at least 1 row (vocabulary entry), got shape "
                         f"{tuple(student_weight.shape)}")
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(f"teacher_hidden must have student_hidden's leading shape {tuple(student_hidden.shape[:-1])}, "
                         f"got {tuple(teacher_hidden.shape[:-1])}")
    if student_hidden.shape[:-1].numel() == 0:
        raise ValueError(f"student_hidden holds no rows (shape {tuple(student_hidden.shape)}); pass at least one")
    for side, bias, weight in (("student", student_bias, student_weight), ("teacher", teacher_bias, teacher_weight)):
        if bias is None:
            continue
        _checks.tensor(f"{side}_bias", bias, dtypes=_checks.FLOAT_DTYPES)
        if bias.shape != (vocab,):
            raise ValueError(f"{side}_bias must have shape ({vocab},) to match {side}_weight, got {tuple(bias.shape)}")
        _checks.same_dtype(f"{side}_bias", bias, f"{side}_weight", weight)
        _checks.same_device(f"{side}_bias", bias, "student_hidden", student_hidden)
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise ValueError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must have an integer dtype, got {str(labels.dtype).replace('torch.', '')}")
        if labels.shape != student_hidden.shape[:-1]:
            raise ValueError(f"labels must have student_hidden's leading shape {tuple(student_hidden.shape[:-1])}, "
                             f"got {tuple(labels.shape)}")
        _checks.same_device("labels", labels, "student_hidden", student_hidden)
    if chunk_size is not None:
        _checks.integer("chunk_size", chunk_size, minimum=1)
    _checks.in_range("temperature", temperature, 0.0, float("inf"), lo_open=True, hi_open=True)
    _checks.in_range("alpha", alpha, 0.0, 1.0)
    _checks.choice("divergence", divergence, DIVERGENCES)
    _checks.in_range("beta", beta, 0.0, 1.0)
    if not isinstance(scale_by_t2, bool):
        raise ValueError(f"scale_by_t2 must be True or False, got {scale_by_t2!r}")
    if ignore_index is not None:
        _checks.integer("ignore_index", ignore_index)
    if soft_label_index is not None:
        _checks.integer("soft_label_index", soft_label_index)
        if soft_label_index == ignore_index:
            raise ValueError(f"soft_label_index must differ from ignore_index, both are {ignore_index}")
    _checks.choice("reduction", reduction, REDUCTIONS)
    _check_num_items(num_items_in_batch, reduction, student_hidden.device)
    # kd_loss checks each chunk's labels too, but only after that chunk's GEMMs: here a bad label
    # stops the call before any work
    if labels is not None and _checks.values_checked(labels) and not torch.compiler.is_compiling():
        ok = _labels_ok(labels, vocab, ignore_index, soft_label_index)
        if not bool(ok.all()):
            bad = labels[~ok]
            raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index} or "
                             f"soft_label_index={soft_label_index}; found {bad.numel()} out of range, "
                             f"e.g. {int(bad[0])}")


def fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *,
                         student_bias=None, teacher_bias=None, chunk_size=None, temperature=1.0, alpha=1.0,
                         divergence="forward_kl", beta=0.5, scale_by_t2=True, ignore_index=-100,
                         soft_label_index=None, reduction="mean", num_items_in_batch=None, return_per_example=False):
    """:func:`sage_fast.ops.kd_loss` of ``student_hidden @ student_weight.T + student_bias`` against
    ``teacher_hidden @ teacher_weight.T + teacher_bias``, without building either ``[N, V]`` matrix.

    Args:
        student_hidden: ``[..., H_s]`` float hidden states (the input of the student's output head);
            the gradient flows here.
        student_weight: ``[V, H_s]`` the student's head weight (``lm_head.weight``), same dtype and
            device; the gradient flows here.
        teacher_hidden: ``[..., H_t]`` with student_hidden's leading shape; a target (no gradient).
        teacher_weight: ``[V, H_t]``, the same V; a target.
        labels: optional integer ``[...]`` (the leading shape) next-token ids, ``ignore_index`` for
            tokens that count in no term (padding, prompt), ``soft_label_index`` for rows that keep
            the divergence but have no cross-entropy.
        student_bias, teacher_bias: optional ``[V]`` head biases.
        chunk_size: rows per chunk; default: about 16M logits a chunk on the CPU, 128M on CUDA.
        temperature, alpha, divergence, beta, scale_by_t2, ignore_index, soft_label_index, reduction,
        num_items_in_batch: as in :func:`sage_fast.ops.kd_loss`: ``"mean"`` (and ``"batchmean"``)
            over the rows that count, ``"sum"``, ``"none"`` (the differentiable per-row losses in the
            leading shape); with ``num_items_in_batch`` the summed loss divided by it.
        return_per_example: also return the detached float32 per-row losses, in the leading shape.

    Returns the loss, or ``(loss, per_example)``. Raises ``ValueError`` naming the argument for a
    head weight whose width differs from its hidden states, heads of different vocabularies, labels
    or biases of the wrong shape, and every bad value ``kd_loss`` refuses.
    """
    _check(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias,
           chunk_size, temperature, alpha, divergence, beta, scale_by_t2, ignore_index, soft_label_index, reduction,
           num_items_in_batch)
    device_type = student_hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # as F.linear would under autocast: both heads in the autocast dtype (the casts are
        # differentiable, so the gradients reach the parameters in their own dtype); inside, every
        # op then runs in the dtype of its inputs
        low = torch.get_autocast_dtype(device_type)
        student_hidden, student_weight, teacher_hidden, teacher_weight = (
            x.to(low) for x in (student_hidden, student_weight, teacher_hidden, teacher_weight))
        student_bias, teacher_bias = (None if b is None else b.to(low) for b in (student_bias, teacher_bias))
        with torch.autocast(device_type, enabled=False):
            return fused_linear_kd_loss(
                student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias=student_bias,
                teacher_bias=teacher_bias, chunk_size=chunk_size, temperature=temperature, alpha=alpha,
                divergence=divergence, beta=beta, scale_by_t2=scale_by_t2, ignore_index=ignore_index,
                soft_label_index=soft_label_index, reduction=reduction, num_items_in_batch=num_items_in_batch,
                return_per_example=return_per_example)
    leading = student_hidden.shape[:-1]
    h = student_hidden.reshape(-1, student_hidden.shape[-1])
    k = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    y = None if labels is None else labels.reshape(-1)
    n_rows = h.shape[0]
    vocab = student_weight.shape[0]
    if chunk_size is None:
        chunk_size = default_chunk_size(n_rows, vocab, h.device)
    acc = torch.float64 if torch.float64 in (h.dtype, k.dtype) else torch.float32
    reduction = "mean" if reduction == "batchmean" else reduction
    # "sum" without num_items_in_batch needs no scale: None spares a pass over the gradients
    scale = None if reduction == "sum" and num_items_in_batch is None else \
        _reduction_scale(reduction, y, ignore_index, num_items_in_batch, n_rows, acc, h.device)
    kd_kwargs = dict(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta, scale_by_t2=scale_by_t2,
                     ignore_index=ignore_index, soft_label_index=soft_label_index)
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    loss, per_row = _FusedLinearKDLossFunction.apply(
        h, student_weight, student_bias, k, teacher_weight.detach(), teacher_bias, y, scale, chunk_size, kd_kwargs,
        reduction)
    if reduction == "none":
        loss = loss.view(leading)
    if not return_per_example:
        return loss
    return loss, per_row.detach().float().view(leading)


def fused_linear_kd_loss_reference(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *,
                                   student_bias=None, teacher_bias=None, chunk_size=None, **kd_kwargs):
    """The same loss as a plain composition: both models' full logits, then ``kd_loss_reference``."""
    del chunk_size  # the composition has no chunks
    student_logits = torch.nn.functional.linear(student_hidden, student_weight, student_bias)
    teacher_logits = torch.nn.functional.linear(teacher_hidden.detach(), teacher_weight.detach(),
                                                None if teacher_bias is None else teacher_bias.detach())
    return kd_loss_reference(student_logits, teacher_logits, labels, **kd_kwargs)
