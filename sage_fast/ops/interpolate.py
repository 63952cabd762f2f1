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

The Triton kernel does the gather, the interpolation, the mask OR and the noise in one pass. The
plain-torch path draws its noise from a ``torch.Generator`` seeded with ``seed``: both are
N(0, noise_std^2) and reproducible per seed, but the two backends give different noise streams.

Synthetic vectors are data, not a function of trainable parameters: the op is not differentiable
(it detaches ``vectors`` and ``lam``, and returns tensors that do not require grad). NaN or inf in
``vectors`` propagate to the rows that use them.

**Noise stream (Triton kernel).** Let ``e = (m L + l) d_total + d`` be the flat index of output
element ``(m, l, d)``. Philox-4x32-10 keyed by ``seed`` (the same generator as ``tl.randint4x``) gives
for the 64-bit counter ``c = e // 4`` four words ``w0 .. w3``; with ``u(w) = (w + 1/2) / 2^32``,
Box-Muller makes ``(z0, z1) = sqrt(-2 ln u(w0)) (cos, sin)(2 pi u(w1) - pi)`` and ``(z2, z3)`` from
``(w2, w3)`` alike, and elements ``4c, 4c + 1, 4c + 2, 4c + 3`` take ``z0, z2, z1, z3``. One Philox
call thus serves four elements, and an element's noise depends only on the seed, its position and the
output's shape, never on the launch grid or the tile sizes. On a GPU the transcendental functions are
the hardware approximations (``lg2.approx``, ``sqrt.approx``, ``sin.approx``, ``cos.approx``: errors
near 1e-6, and noise costs about as much as the memory traffic); the interpreter uses exact functions,
so interpreter and GPU agree to that precision.

**Value checks.** Index ranges, ``lam`` in [0, 1] and 0/1 mask values are checked where values are
checked (on CPU, except under ``torch.compile``; on CUDA with ``sage_fast.check_values(True)`` or
``SAGE_FAST_CHECK_VALUES=1``, since the checks cost a device synchronisation). Unchecked on CUDA,
the kernel turns a row whose anchor or partner index is outside ``[0, N)`` into NaN with an all-zero
mask (it never reads out of bounds), a ``lam`` outside [0, 1] extrapolates, and any non-zero mask
value counts as 1.
"""
from __future__ import annotations

import torch

from .. import _checks
from .._backend import interpreter_enabled, use_triton

__all__ = ["interpolate", "interpolate_reference"]

VECTOR_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32)
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
LAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
MAX_SEED = 2**63 - 1

try:  # triton is optional: without it every tensor takes the plain-torch path
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - only where triton is absent
    triton = None

if triton is not None:

    @triton.jit
    def _mul_wide(a, B: tl.constexpr, GPU: tl.constexpr):
        """High and low words of the 64-bit product a * B (a uint32, B a 32-bit constant)."""
        if GPU:
            # one wide multiply gives both halves (separate high and low multiplies cost twice the
            # integer instructions); 64-bit tensor arithmetic would also do it, but Triton then moves
            # the noise through shared memory to change its register layout
            return tl.inline_asm_elementwise(
                "{ .reg .b64 t; mul.wide.u32 t, $2, " + B + "; mov.b64 {$1, $0}, t; }", "=r,=r,r", [a],
                dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1)
        return tl.umulhi(a, int(B, 16)), a * int(B, 16)

    @triton.jit
    def _philox(seed, c0, c1, GPU: tl.constexpr, N_ROUNDS: tl.constexpr = 10):
        """Philox-4x32-10 (Salmon et al. 2011) of the counter (c0, c1, 0, 0) under the 64-bit key
        ``seed``: the same words as ``tl.randint4x``."""
        seed = seed.to(tl.uint64)
        k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
        k1 = (seed >> 32).to(tl.uint32)
        c2 = c0 * 0
        c3 = c2
        for _ in tl.static_range(N_ROUNDS):
            hi0, lo0 = _mul_wide(c0, "0xD2511F53", GPU)
            hi1, lo1 = _mul_wide(c2, "0xCD9E8D57", GPU)
            c0 = hi1 ^ c1 ^ k0
            c2 = hi0 ^ c3 ^ k1
            c1 = lo1
            c3 = lo0
            k0 += 0x9E3779B9
            k1 += 0xBB67AE85
        return c0, c1, c2, c3

    @triton.jit
    def _box_muller(bits_1, bits_2, GPU: tl.constexpr):
        """Two N(0, 1) draws from two uint32 words (Box-Muller)."""
        u1 = bits_1.to(tl.float32) * 2.3283064e-10 + 1.1641532e-10  # (bits + 1/2) / 2^32, in (0, 1]
        angle = bits_2.to(tl.float32) * 1.4629180e-09 - 3.141592653589793  # 2 pi u2 - pi: sin.approx is accurate there
        if GPU:
            log2_u1 = libdevice.fast_log2f(u1)
            cos, sin = libdevice.fast_cosf(angle), libdevice.fast_sinf(angle)
        else:
            log2_u1 = tl.log2(u1)
            cos, sin = tl.cos(angle), tl.sin(angle)
        # max(., 0): an approximate log2 of a number just below 1 may come out just above 0
        radius = tl.sqrt(tl.maximum(-1.3862943611198906 * log2_u1, 0.0))  # sqrt(-2 ln u1)
        return radius * cos, radius * sin

    @triton.jit
    def _normals(seed, counter, WIDE_COUNTER: tl.constexpr, GPU: tl.constexpr):
        """The four N(0, 1) draws of each Philox counter (int64): Box-Muller of words (0, 1) gives
        z0 (cosine) and z1 (sine), of words (2, 3) z2 and z3."""
        if WIDE_COUNTER:
            r0, r1, r2, r3 = _philox(seed, counter.to(tl.uint32), (counter >> 32).to(tl.uint32), GPU)
        else:  # the counters fit 32 bits: the high word is the constant 0
            r0, r1, r2, r3 = _philox(seed, counter.to(tl.uint32), tl.zeros(counter.shape, tl.uint32), GPU)
        n0, n1 = _box_muller(r0, r1, GPU)
        n2, n3 = _box_muller(r2, r3, GPU)
        return n0, n1, n2, n3

    @triton.jit
    def _noise_tile(seed, row_start, in_row, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, GROUPED: tl.constexpr,
                    WIDE_COUNTER: tl.constexpr, GPU: tl.constexpr):
        """N(0, 1) noise of the output elements ``row_start + in_row`` (flat indices; ``in_row`` a
        [BLOCK_L x BLOCK_D] tile), in the stream the module docstring defines."""
        if GROUPED:
            # D is a multiple of 4, so the tile holds whole groups of four consecutive elements: one
            # Philox call per group. The groups' first elements are split out of ``in_row`` itself, so
            # the noise is computed in the tile's register layout and joined back without a shuffle
            # through shared memory (``in_row`` is 32-bit: Triton keeps the layout through the
            # reshapes of 32-bit tensors, not of 64-bit ones).
            evens, _ = tl.split(tl.reshape(in_row, [BLOCK_L, BLOCK_D // 2, 2]))
            firsts, _ = tl.split(tl.reshape(evens, [BLOCK_L, BLOCK_D // 4, 2]))
            z0, z1, z2, z3 = _normals(seed, row_start // 4 + (firsts >> 2), WIDE_COUNTER, GPU)
            # [BLOCK_L, BLOCK_D / 4, 2, 2] flattened: elements 4c .. 4c + 3 take z0, z2, z1, z3. Each
            # Box-Muller pair goes into one inner join; joined the other way round, Triton would move
            # the noise through shared memory to change its register layout.
            return tl.reshape(tl.join(tl.join(z0, z1), tl.join(z2, z3)), [BLOCK_L, BLOCK_D])
        else:
            # Groups of four straddle tokens: one Philox call per element, same stream.
            index = row_start + in_row
            z0, z1, z2, z3 = _normals(seed, index >> 2, WIDE_COUNTER, GPU)
            k = index & 3
            return tl.where(k == 0, z0, tl.where(k == 1, z2, tl.where(k == 2, z1, z3)))

    @triton.jit
    def _interpolate_kernel(
        vectors_ptr, mask_ptr, anchors_ptr, partners_ptr, lam_ptr, out_ptr, out_mask_ptr,
        N, L, D,
        stride_vn, stride_vl, stride_mn, stride_ml,
        noise_std, seed,
        ADD_NOISE: tl.constexpr, GROUPED: tl.constexpr, WIDE_COUNTER: tl.constexpr, WIDE_ROW: tl.constexpr,
        GPU: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1)
        num_d_tiles = tl.cdiv(D, BLOCK_D)
        l_tile = tile // num_d_tiles
        d_tile = tile % num_d_tiles

        anchor = tl.load(anchors_ptr + row).to(tl.int64)
        partner = tl.load(partners_ptr + row).to(tl.int64)
        lam = tl.load(lam_ptr + row).to(tl.float32)
        # Unchecked indices (CUDA without value checks) never reach memory: such a row is NaN, mask 0.
        in_range = (anchor >= 0) & (anchor < N) & (partner >= 0) & (partner < N)
        anchor = tl.where(in_range, anchor, 0)
        partner = tl.where(in_range, partner, 0)
        lam = tl.where(in_range, lam, float("nan"))  # a NaN weight makes the whole row NaN

        tokens = l_tile * BLOCK_L + tl.arange(0, BLOCK_L)
        features = d_tile * BLOCK_D + tl.arange(0, BLOCK_D)
        if WIDE_ROW:  # one output row spans 2**31 elements or more
            tokens = tokens.to(tl.int64)
        token_ok = tokens < L
        ok = token_ok[:, None] & (features < D)[None, :]

        mask_a = tl.load(mask_ptr + anchor * stride_mn + tokens * stride_ml, mask=token_ok, other=0)
        mask_b = tl.load(mask_ptr + partner * stride_mn + tokens * stride_ml, mask=token_ok, other=0)
        keep = ((mask_a != 0) | (mask_b != 0)) & in_range

        token_offsets = tokens[:, None] * stride_vl + features[None, :]
        # masked-off lanes are never stored, so they need no fill value (saves a select per element)
        x_a = tl.load(vectors_ptr + anchor * stride_vn + token_offsets, mask=ok).to(tl.float32)
        x_b = tl.load(vectors_ptr + partner * stride_vn + token_offsets, mask=ok).to(tl.float32)
        mixed = lam * x_a + (1.0 - lam) * x_b
        row_start = row * L * D
        in_row = tokens[:, None] * D + features[None, :]
        if ADD_NOISE:
            noise = _noise_tile(seed, row_start, in_row, BLOCK_L, BLOCK_D, GROUPED, WIDE_COUNTER, GPU)
            mixed += tl.where(keep, noise_std, 0.0)[:, None] * noise  # noise only where the output mask is 1
        out_row = out_ptr + row_start  # a scalar pointer plus the 32-bit in_row: see _noise_tile
        tl.store(out_row + in_row, mixed.to(out_ptr.dtype.element_ty), mask=ok)

        # Each token's mask is written once, by the program holding its first feature tile.
        if d_tile == 0:
            tl.store(out_mask_ptr + row * L + tokens, keep.to(out_mask_ptr.dtype.element_ty), mask=token_ok)


def block_sizes(L: int, D: int, interpret: bool | None = None) -> tuple[int, int]:
    """Tile shape [BLOCK_L, BLOCK_D]: feature tiles that divide D where they can (768 = 3 x 256, no
    idle lanes), at least 4 wide (a Philox call covers four features); larger tiles in the
    interpreter, which pays per program instance."""
    budget = 16384 if (interpreter_enabled() if interpret is None else interpret) else 4096
    divisor = D & -D  # the largest power of two dividing D
    block_d = min(divisor, 256) if divisor >= 32 else min(triton.next_power_of_2(D), 256)
    block_d = max(block_d, 4)
    block_l = max(1, min(triton.next_power_of_2(L), budget // block_d))
    return block_l, block_d


def _launch(vectors, mask, anchors, partners, lam, noise_std, seed, block_l=None, block_d=None):
    M = anchors.shape[0]
    N, L, D = vectors.shape
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

    grid = (M, triton.cdiv(L, block_l) * triton.cdiv(D, block_d))
    _interpolate_kernel[grid](
        vectors, mask_bytes, anchors, partners, lam, out, out_mask,
        N, L, D,
        vectors.stride(0), vectors.stride(1), mask_bytes.stride(0), mask_bytes.stride(1),
        float(noise_std), int(seed),
        ADD_NOISE=noise_std > 0, GROUPED=D % 4 == 0 and block_d % 4 == 0, WIDE_COUNTER=M * L * D // 4 >= 2**32,
        WIDE_ROW=L * D >= 2**31, GPU=not interpreter_enabled(), BLOCK_L=block_l, BLOCK_D=block_d,
        num_warps=4,
    )
    if mask.dtype == torch.bool:
        out_mask = out_mask.view(torch.bool)
    return out, out_mask


@torch.library.custom_op("sage_fast::interpolate_triton", mutates_args=())
def _interpolate_triton(vectors: torch.Tensor, mask: torch.Tensor, anchors: torch.Tensor, partners: torch.Tensor,
                        lam: torch.Tensor, noise_std: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's launch as one opaque op: ``torch.compile`` records a call with the shapes of the
    fake implementation below instead of tracing into the launcher (the interpreter or the Triton
    runtime), so a compiled step keeps the Triton path without a graph break."""
    return _launch(vectors, mask, anchors, partners, lam, noise_std, seed)


@_interpolate_triton.register_fake
def _(vectors, mask, anchors, partners, lam, noise_std, seed):
    M, (_, L, D) = anchors.shape[0], vectors.shape
    return vectors.new_empty((M, L, D)), mask.new_empty((M, L))


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


@torch.library.custom_op("sage_fast::seeded_normal", mutates_args=())
def _seeded_normal(like: torch.Tensor, seed: int) -> torch.Tensor:
    """N(0, 1) noise shaped like ``like`` from a ``torch.Generator`` seeded with ``seed``. An op of its
    own so that ``torch.compile`` takes it as one node: a generator made inside traced code splits
    the graph twice."""
    generator = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


@_seeded_normal.register_fake
def _(like: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.empty_like(like)


def _interpolate_torch(vectors, mask, anchors, partners, lam, noise_std, seed):
    # Gather before casting (never upcast the whole pool); the gather is a fresh tensor, so the
    # interpolation can run in place on it.
    out = vectors[partners].float()
    out.lerp_(vectors[anchors].float(), lam.float()[:, None, None])
    keep = (mask[anchors] != 0) | (mask[partners] != 0)
    if noise_std > 0:
        out.addcmul_(_seeded_normal(out, seed), keep[..., None].to(out.dtype), value=noise_std)
    return out.to(vectors.dtype), keep.to(mask.dtype)


def _check_values(mask, anchors, partners, lam, N):
    """Index ranges, lam in [0, 1] and 0/1 mask values: one device reduction and one host read."""
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

    # under torch.compile a value read on the host would split the graph: unchecked there, as on CUDA
    if _checks.values_checked(vectors) and not torch.compiler.is_compiling():
        _check_values(mask, anchors, partners, lam, N)
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
        return _interpolate_triton(vectors, mask, anchors, partners, lam, float(noise_std), seed)
    return _interpolate_torch(vectors, mask, anchors, partners, lam, noise_std, seed)
