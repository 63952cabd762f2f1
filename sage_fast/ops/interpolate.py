r"""Synthetic interpolation of padded vector sequences, fused into one kernel.

For each output row ``m`` with anchor ``a = anchors[m]``, partner ``b = partners[m]`` and weight
``lam = lam[m]`` in [0, 1]:

.. math::

    \tilde x_{m,l,:} = \lambda_m x_{a,l,:} + (1 - \lambda_m) x_{b,l,:}
                       + \sigma\, \epsilon_{m,l,:}\, \tilde k_{m,l},
    \qquad \tilde k_{m,l} = k_{a,l} \lor k_{b,l},

where ``k`` is the attention mask, ``sigma = noise_std`` and ``epsilon ~ N(0, 1)``. Noise is added
only where the output mask is 1; padded positions get exactly the interpolation. The arithmetic is
done in float32 and stored in the vectors' dtype.

The Triton kernel does the gather, the interpolation, the mask OR and the noise in one pass. Its
noise comes from a counter-based Philox generator keyed by ``seed`` and by each output element's
global index, so it is the same for any tiling. The plain-torch path draws its noise from a
``torch.Generator`` seeded with ``seed``: both are N(0, noise_std^2) and reproducible per seed, but
the two backends give different noise streams.

Synthetic vectors are data, not a function of trainable parameters: the op is not differentiable
(it detaches ``vectors`` and ``lam``, and returns tensors that do not require grad). NaN or inf in
``vectors`` propagate to the rows that use them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _checks
from .._backend import interpreter_enabled, use_triton

__all__ = ["interpolate", "interpolate_reference"]

VECTOR_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32)
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
LAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
MAX_SEED = 2**63 - 1

# Tests set this to pre-fill the launcher's outputs with NaN / a sentinel, so that any element the
# kernel fails to write shows up.
_POISON_OUTPUTS = False
MASK_SENTINEL = 7


@triton.jit
def _interpolate_kernel(
    vectors_ptr, mask_ptr, anchors_ptr, partners_ptr, lam_ptr, out_ptr, out_mask_ptr,
    L, D,
    stride_vn, stride_vl, stride_mn, stride_ml,
    noise_std, seed,
    ADD_NOISE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    tile = tl.program_id(1)
    num_d_tiles = tl.cdiv(D, BLOCK_D)
    l_tile = tile // num_d_tiles
    d_tile = tile % num_d_tiles

    anchor = tl.load(anchors_ptr + row).to(tl.int64)
    partner = tl.load(partners_ptr + row).to(tl.int64)
    lam = tl.load(lam_ptr + row).to(tl.float32)

    tokens = l_tile * BLOCK_L + tl.arange(0, BLOCK_L)
    features = d_tile * BLOCK_D + tl.arange(0, BLOCK_D)
    token_ok = tokens < L
    ok = token_ok[:, None] & (features < D)[None, :]

    mask_a = tl.load(mask_ptr + anchor * stride_mn + tokens * stride_ml, mask=token_ok, other=0)
    mask_b = tl.load(mask_ptr + partner * stride_mn + tokens * stride_ml, mask=token_ok, other=0)
    keep = (mask_a != 0) | (mask_b != 0)

    token_offsets = tokens[:, None] * stride_vl + features[None, :]
    x_a = tl.load(vectors_ptr + anchor * stride_vn + token_offsets, mask=ok, other=0.0).to(tl.float32)
    x_b = tl.load(vectors_ptr + partner * stride_vn + token_offsets, mask=ok, other=0.0).to(tl.float32)
    mixed = lam * x_a + (1.0 - lam) * x_b

    # The global element index both addresses the output and keys the noise, so the noise does not
    # depend on the block sizes.
    out_index = row.to(tl.int64) * L * D + tokens[:, None].to(tl.int64) * D + features[None, :]
    if ADD_NOISE:
        noise = tl.randn(seed, out_index)
        mixed = tl.where(keep[:, None], mixed + noise_std * noise, mixed)
    tl.store(out_ptr + out_index, mixed.to(out_ptr.dtype.element_ty), mask=ok)

    # Each token's mask is written once, by the program holding its first feature tile.
    if d_tile == 0:
        tl.store(out_mask_ptr + row.to(tl.int64) * L + tokens, keep.to(out_mask_ptr.dtype.element_ty),
                 mask=token_ok)


def block_sizes(L: int, D: int) -> tuple[int, int]:
    """Tile shape [BLOCK_L, BLOCK_D]: large tiles; larger still in the interpreter, which pays per
    program instance."""
    budget = 16384 if interpreter_enabled() else 4096
    block_d = min(triton.next_power_of_2(D), 256)
    block_l = max(1, min(triton.next_power_of_2(L), budget // block_d))
    return block_l, block_d


def _launch(vectors, mask, anchors, partners, lam, noise_std, seed, block_l=None, block_d=None):
    M = anchors.shape[0]
    _, L, D = vectors.shape
    if vectors.stride(-1) != 1:
        vectors = vectors.contiguous()
    # The kernel reads one index and one weight per row at unit stride.
    anchors, partners, lam = anchors.contiguous(), partners.contiguous(), lam.contiguous()
    default_l, default_d = block_sizes(L, D)
    block_l = block_l or default_l
    block_d = block_d or default_d

    out = torch.empty((M, L, D), dtype=vectors.dtype, device=vectors.device)
    # bool tensors are stored one byte each; the kernel reads and writes them as uint8.
    mask_bytes = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    out_mask = torch.empty((M, L), dtype=mask_bytes.dtype, device=mask.device)
    if _POISON_OUTPUTS:
        out.fill_(float("nan"))
        out_mask.fill_(MASK_SENTINEL)

    grid = (M, triton.cdiv(L, block_l) * triton.cdiv(D, block_d))
    _interpolate_kernel[grid](
        vectors, mask_bytes, anchors, partners, lam, out, out_mask,
        L, D,
        vectors.stride(0), vectors.stride(1), mask_bytes.stride(0), mask_bytes.stride(1),
        float(noise_std), int(seed),
        ADD_NOISE=noise_std > 0, BLOCK_L=block_l, BLOCK_D=block_d,
        num_warps=4,
    )
    if mask.dtype == torch.bool:
        out_mask = out_mask.view(torch.bool)
    return out, out_mask


def interpolate_reference(vectors, mask, anchors, partners, lam, noise=None):
    """Plain-torch interpolation, computed in float32 (float64 for float64 vectors) and returned in
    that dtype; ``noise`` (shaped like the output) is added where the output mask is 1."""
    compute = torch.promote_types(vectors.dtype, torch.float32)
    x = vectors.detach().to(compute)
    weight = lam.detach().to(compute)[:, None, None]
    out = weight * x[anchors] + (1.0 - weight) * x[partners]
    keep = (mask[anchors] != 0) | (mask[partners] != 0)
    if noise is not None:
        out = out + noise.to(compute) * keep[..., None]
    return out, keep.to(mask.dtype)


def _interpolate_torch(vectors, mask, anchors, partners, lam, noise_std, seed):
    # Gather before casting (never upcast the whole pool); the gather is a fresh tensor, so the
    # interpolation can run in place on it.
    out = vectors[partners].float()
    out.lerp_(vectors[anchors].float(), lam.float()[:, None, None])
    keep = (mask[anchors] != 0) | (mask[partners] != 0)
    if noise_std > 0:
        generator = torch.Generator(device=vectors.device).manual_seed(seed)
        noise = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
        out.addcmul_(noise, keep[..., None].to(out.dtype), value=noise_std)
    return out.to(vectors.dtype), keep.to(mask.dtype)


def _check(vectors, mask, anchors, partners, lam, noise_std, seed):
    _checks.tensor("vectors", vectors, ndim=3, dtypes=VECTOR_DTYPES)
    _checks.tensor("mask", mask, ndim=2, dtypes=MASK_DTYPES)
    _checks.tensor("anchors", anchors, ndim=1, dtypes=INDEX_DTYPES)
    _checks.tensor("partners", partners, ndim=1, dtypes=INDEX_DTYPES)
    _checks.tensor("lam", lam, ndim=1, dtypes=LAM_DTYPES)
    N, L, D = vectors.shape
    if N == 0:
        raise ValueError("vectors is empty (N = 0 sequences); pass at least one sequence to interpolate from")
    if L == 0 or D == 0:
        raise ValueError(f"vectors must have at least one token and one feature, got shape {tuple(vectors.shape)}")
    if tuple(mask.shape) != (N, L):
        raise ValueError(f"mask must have shape [N, L] = {[N, L]} to match vectors, got {list(mask.shape)}")
    M = anchors.shape[0]
    if partners.shape[0] != M or lam.shape[0] != M:
        raise ValueError(
            f"anchors, partners and lam must have the same length M, got {M}, {partners.shape[0]} and {lam.shape[0]}"
        )
    if M == 0:
        raise ValueError("anchors is empty (m = 0 rows to synthesise); pass at least one anchor")
    for name, value in (("mask", mask), ("anchors", anchors), ("partners", partners), ("lam", lam)):
        _checks.same_device("vectors", vectors, name, value)
    noise_std = _checks.in_range("noise_std", noise_std, 0.0, float("inf"), hi_open=True)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an int in [0, 2**63 - 1], got {seed!r}")

    # One device reduction and one synchronisation for every value check.
    if mask.dtype == torch.bool:
        mask_not_binary = torch.zeros((), dtype=torch.bool, device=mask.device)
    else:
        mask_not_binary = ((mask != 0) & (mask != 1)).any()
    flags = torch.stack([
        ((anchors < 0) | (anchors >= N)).any(),
        ((partners < 0) | (partners >= N)).any(),
        (~((lam >= 0) & (lam <= 1))).any(),  # also catches NaN
        mask_not_binary,
    ]).tolist()
    if flags[0]:
        raise ValueError(f"anchors has indices outside [0, N) = [0, {N}); each must index a row of vectors")
    if flags[1]:
        raise ValueError(f"partners has indices outside [0, N) = [0, {N}); each must index a row of vectors")
    if flags[2]:
        raise ValueError("lam has values outside [0, 1] or non-finite values; each weight must be in [0, 1]")
    if flags[3]:
        raise ValueError("mask has values other than 0 and 1; pass a bool or 0/1 integer attention mask")
    return noise_std


def interpolate(vectors, mask, anchors, partners, lam, *, noise_std: float = 0.0, seed: int = 0):
    """Synthesise ``M`` sequences ``lam*vectors[anchors] + (1-lam)*vectors[partners]`` token-wise.

    Args:
        vectors: ``[N, L, d]`` float32, bfloat16 or float16 input vectors (padded sequences).
        mask: ``[N, L]`` bool or 0/1 integer attention mask.
        anchors, partners: ``[M]`` int64 (or int32) row indices into ``vectors``.
        lam: ``[M]`` float weights in [0, 1] of the anchors.
        noise_std: standard deviation of Gaussian noise added where the output mask is 1.
        seed: non-negative int; the same seed gives the same noise on the same backend.

    Returns:
        ``(out, out_mask)``: ``[M, L, d]`` in vectors' dtype and ``[M, L]`` in mask's dtype
        (``mask[anchors] | mask[partners]``). Neither requires grad.
    """
    noise_std = _check(vectors, mask, anchors, partners, lam, noise_std, seed)
    vectors = vectors.detach()
    lam = lam.detach()
    if use_triton(vectors.device):
        return _launch(vectors, mask, anchors, partners, lam, noise_std, seed)
    return _interpolate_torch(vectors, mask, anchors, partners, lam, noise_std, seed)
