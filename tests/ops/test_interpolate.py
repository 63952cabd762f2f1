import importlib

import numpy as np
import pytest
import torch

try:  # the kernel tests need triton; the torch-path tests do not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - only where triton is absent
    triton = None

from sage_fast import use_backend
from sage_fast.ops.interpolate import interpolate, interpolate_reference

# sage_fast.ops re-exports the function under the module's name, so fetch the module itself.
interpolate_module = importlib.import_module("sage_fast.ops.interpolate")

TOLERANCES = {
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-2),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
}

# (N, L, d, M): a single row; odd sizes; d wider than one 256-wide block; M > N (repeated rows).
SHAPES = [(1, 1, 1, 1), (4, 7, 33, 5), (3, 3, 300, 2), (3, 5, 16, 9)]


#: What a poisoned integer or bool output holds until written: neither 0 nor 1.
MASK_SENTINEL = 7


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every tensor torch.empty makes during a test starts as NaN (floats) or MASK_SENTINEL (masks), so
    an element the kernel fails to write shows up."""
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else MASK_SENTINEL)

    monkeypatch.setattr(torch, "empty", poisoned_empty)


def make_inputs(N, L, d, M, dtype=torch.float32, mask_dtype=torch.bool, device="cpu"):
    vectors = torch.randn(N, L, d, device=device).to(dtype)
    mask = (torch.rand(N, L, device=device) < 0.6).to(mask_dtype)
    anchors = torch.randint(0, N, (M,), device=device)
    partners = torch.randint(0, N, (M,), device=device)
    partners[0] = anchors[0]  # an anchor interpolated with itself
    lam = torch.rand(M, device=device)
    lam[-1] = 1.0
    return vectors, mask, anchors, partners, lam


def assert_mask_written(out_mask):
    raw = out_mask.view(torch.uint8) if out_mask.dtype == torch.bool else out_mask
    assert bool(((raw == 0) | (raw == 1)).all()), "out_mask has unwritten elements"


def check_against_reference(inputs, out, out_mask):
    vectors, mask = inputs[0], inputs[1]
    expected, expected_mask = interpolate_reference(vectors.double(), *inputs[1:])
    assert out.dtype == vectors.dtype and out_mask.dtype == mask.dtype
    assert not out.requires_grad and not out_mask.requires_grad
    assert_mask_written(out_mask)
    assert torch.equal(out_mask, expected_mask)
    torch.testing.assert_close(out.double(), expected, **TOLERANCES[vectors.dtype])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-L{}-d{}-M{}".format(*s))
@pytest.mark.parametrize("dtype,mask_dtype", [
    (torch.float32, torch.bool), (torch.bfloat16, torch.int64), (torch.float16, torch.uint8),
])
def test_matches_float64_reference(seed, device, shape, dtype, mask_dtype):
    inputs = make_inputs(*shape, dtype=dtype, mask_dtype=mask_dtype, device=device)
    out, out_mask = interpolate(*inputs)
    check_against_reference(inputs, out, out_mask)


@pytest.mark.parametrize("dtype,mask_dtype", [(torch.float32, torch.bool), (torch.bfloat16, torch.int32)])
def test_torch_path_matches_reference(seed, dtype, mask_dtype):
    inputs = make_inputs(4, 7, 33, 6, dtype=dtype, mask_dtype=mask_dtype)
    with use_backend("torch"):
        out, out_mask = interpolate(*inputs)
    check_against_reference(inputs, out, out_mask)


def test_int32_indices_and_strided_inputs(device):
    vectors, mask, anchors, partners, lam = make_inputs(4, 6, 20, 5, device=device)
    strided_vectors = torch.randn(4, 9, 20, device=device)[:, 2:8]
    strided_mask = mask.t().contiguous().t()
    strided_anchors = torch.stack([anchors, partners], dim=1)[:, 0]
    strided_lam = torch.stack([lam, lam.flip(0)], dim=1)[:, 0]
    out, out_mask = interpolate(strided_vectors, strided_mask, strided_anchors, partners.int(), strided_lam)
    check_against_reference((strided_vectors, strided_mask, anchors, partners, lam), out, out_mask)


def test_inputs_are_detached_and_unchanged(device):
    vectors, mask, anchors, partners, lam = make_inputs(3, 4, 8, 4, device=device)
    vectors.requires_grad_(True)
    lam.requires_grad_(True)
    before = [t.detach().clone() for t in (vectors, mask, anchors, partners, lam)]
    out, out_mask = interpolate(vectors, mask, anchors, partners, lam, noise_std=0.1, seed=5)
    assert not out.requires_grad
    for old, new in zip(before, (vectors, mask, anchors, partners, lam)):
        assert torch.equal(old, new.detach())


def noise_of(backend, device, noise_std=0.3, seed=11):
    # 8 rows x 64 tokens x 256 features: enough samples, few interpreter programs.
    torch.manual_seed(0)
    inputs = make_inputs(6, 64, 256, 8, device=device)
    with use_backend(backend):
        clean, out_mask = interpolate(*inputs)
        noisy, noisy_mask = interpolate(*inputs, noise_std=noise_std, seed=seed)
    assert torch.equal(out_mask, noisy_mask)
    return (noisy - clean).double(), out_mask


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_noise_statistics(device, backend):
    noise_std = 0.3
    noise, out_mask = noise_of(backend, device, noise_std)
    inside = noise[out_mask]
    assert inside.numel() > 50_000
    assert abs(float(inside.mean())) < 5 * noise_std / inside.numel() ** 0.5
    assert float(inside.std()) == pytest.approx(noise_std, rel=0.02)
    assert float((inside.abs() > 4 * noise_std).double().mean()) < 1e-3
    assert bool((noise[~out_mask] == 0).all()), "masked-out positions must get no noise"


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_noise_is_determined_by_seed(device, backend):
    inputs = make_inputs(3, 5, 24, 4, device=device)
    with use_backend(backend):
        first, _ = interpolate(*inputs, noise_std=0.5, seed=3)
        again, _ = interpolate(*inputs, noise_std=0.5, seed=3)
        other, other_mask = interpolate(*inputs, noise_std=0.5, seed=4)
    assert torch.equal(first, again)
    assert not torch.equal(first[other_mask], other[other_mask])


def test_noise_does_not_depend_on_tiling(device):
    if not interpolate_module.use_triton(device):
        pytest.skip("Triton kernel not runnable here")
    vectors, mask, anchors, partners, lam = make_inputs(3, 5, 40, 2, device=device)
    args = (vectors, mask, anchors, partners, lam, 0.5, 9)
    default, default_mask = interpolate_module._launch(*args)
    small, small_mask = interpolate_module._launch(*args, block_l=2, block_d=16)
    assert_mask_written(small_mask)
    assert torch.equal(default, small)
    assert torch.equal(default_mask, small_mask)


def good_inputs():
    return dict(zip(("vectors", "mask", "anchors", "partners", "lam"), make_inputs(4, 3, 5, 3)))


def replace(**changes):
    def build():
        args = good_inputs()
        for name, change in changes.items():
            args[name] = change(args) if callable(change) else change
        return args
    return build


BAD_INPUTS = {
    "vectors-not-tensor": (replace(vectors=[[[1.0]]]), "vectors must be a torch.Tensor"),
    "vectors-2d": (replace(vectors=lambda a: a["vectors"][0]), "vectors must have 3 dimensions"),
    "vectors-int": (replace(vectors=lambda a: a["vectors"].long()), "vectors must have dtype"),
    "vectors-empty": (replace(vectors=torch.zeros(0, 3, 5), mask=torch.zeros(0, 3, dtype=torch.bool)),
                      "vectors is empty"),
    "vectors-no-features": (replace(vectors=torch.zeros(4, 3, 0)), "at least one token and one feature"),
    "mask-shape": (replace(mask=lambda a: a["mask"][:, :2]), "mask must have shape"),
    "mask-float": (replace(mask=lambda a: a["mask"].float()), "mask must have dtype"),
    "mask-not-binary": (replace(mask=lambda a: a["mask"].long() * 2), "mask has values other than 0 and 1"),
    "anchors-float": (replace(anchors=lambda a: a["anchors"].float()), "anchors must have dtype"),
    "anchors-2d": (replace(anchors=lambda a: a["anchors"][None]), "anchors must have 1 dimensions"),
    "anchors-empty": (replace(anchors=torch.zeros(0, dtype=torch.long), partners=torch.zeros(0, dtype=torch.long),
                              lam=torch.zeros(0)), "anchors is empty"),
    "anchors-too-large": (replace(anchors=torch.tensor([0, 4, 1])), r"anchors has indices outside \[0, N\)"),
    "anchors-negative": (replace(anchors=torch.tensor([0, -1, 1])), r"anchors has indices outside \[0, N\)"),
    "partners-too-large": (replace(partners=torch.tensor([0, 1, 9])), r"partners has indices outside \[0, N\)"),
    "partners-length": (replace(partners=torch.tensor([0, 1])), "must have the same length M"),
    "lam-length": (replace(lam=torch.rand(4)), "must have the same length M"),
    "lam-int": (replace(lam=torch.ones(3, dtype=torch.long)), "lam must have dtype"),
    "lam-above-one": (replace(lam=torch.tensor([0.5, 1.5, 0.0])), r"lam has values outside \[0, 1\]"),
    "lam-negative": (replace(lam=torch.tensor([0.5, -0.1, 0.0])), r"lam has values outside \[0, 1\]"),
    "lam-nan": (replace(lam=torch.tensor([0.5, float("nan"), 0.0])), r"lam has values outside \[0, 1\]"),
    "device-differs": (replace(lam=torch.rand(3, device="meta")), "must be on the same device"),
    "noise-negative": (replace(noise_std=-0.1), "noise_std must be in"),
    "noise-nan": (replace(noise_std=float("nan")), "noise_std must be in"),
    "noise-inf": (replace(noise_std=float("inf")), "noise_std must be in"),
    "seed-negative": (replace(seed=-1), "seed must be an int"),
    "seed-float": (replace(seed=1.5), "seed must be an int"),
    "seed-bool": (replace(seed=True), "seed must be an int"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_before_launch(monkeypatch, case):
    build, message = case

    def must_not_run(*args, **kwargs):
        raise AssertionError("launched despite bad input")

    monkeypatch.setattr(interpolate_module, "_launch", must_not_run)
    monkeypatch.setattr(interpolate_module, "_interpolate_torch", must_not_run)
    with pytest.raises(ValueError, match=message):
        interpolate(**build())


# ------------------------------------------------------------------------------ the Triton noise stream
def _philox_reference(seed: int, counters: np.ndarray) -> list[np.ndarray]:
    """Philox-4x32-10 (Salmon et al. 2011) of counters (c0 = low word, c1 = high word, 0, 0), in numpy."""
    mask = np.uint64(0xFFFFFFFF)
    c0 = counters.astype(np.uint64) & mask
    c1 = counters.astype(np.uint64) >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for _ in range(10):
        p0 = c0 * np.uint64(0xD2511F53)
        p1 = c2 * np.uint64(0xCD9E8D57)
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & mask)
        k0 = (k0 + np.uint64(0x9E3779B9)) & mask
        k1 = (k1 + np.uint64(0xBB67AE85)) & mask
    return [c0, c1, c2, c3]


def documented_noise(seed: int, shape) -> np.ndarray:
    """The module docstring's stream: element e takes (z0, z2, z1, z3)[e % 4] of Philox counter e // 4."""
    index = np.arange(int(np.prod(shape)), dtype=np.int64)
    words = _philox_reference(seed, index // 4)
    u = [(w.astype(np.float64) + 0.5) / 2.0**32 for w in words]
    z = [None] * 4
    for first in (0, 2):
        radius = np.sqrt(-2.0 * np.log(u[first]))
        angle = 2 * np.pi * u[first + 1] - np.pi
        z[first], z[first + 1] = radius * np.cos(angle), radius * np.sin(angle)
    draws = np.stack([z[0], z[2], z[1], z[3]])
    return draws[index % 4, index].reshape(shape)


if triton is not None:

    @triton.jit
    def _philox_words_kernel(out_ptr, seed, high, n, GPU: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        low = offsets.to(tl.uint32) * 0x9E3779B1  # spread the counters over the 32-bit range
        ours = interpolate_module._philox(seed, low, low * 0 + high, GPU)
        theirs = tl.randint4x(seed, low.to(tl.uint64) + (tl.full([BLOCK], high, tl.uint64) << 32))
        for k in tl.static_range(4):
            tl.store(out_ptr + k * BLOCK + offsets, ours[k], mask=offsets < n)
            tl.store(out_ptr + (4 + k) * BLOCK + offsets, theirs[k], mask=offsets < n)


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 12345], ids=["seed0", "seed7", "seed-64-bit"])
@pytest.mark.parametrize("high", [0, 3], ids=["32-bit-counter", "64-bit-counter"])
def test_philox_is_tritons(device, seed, high):
    """The kernel's Philox (one wide multiply per product; inline PTX on a GPU) gives the words of
    tl.randint4x and of the numpy reference."""
    if triton is None or not interpolate_module.use_triton(device):
        pytest.skip("Triton kernel not runnable here")
    block = 64
    out = torch.zeros(8, block, dtype=torch.int32, device=device)
    _philox_words_kernel[(1,)](out, seed, high, block, GPU=device.type == "cuda", BLOCK=block)
    words = out.cpu().numpy().view(np.uint32).astype(np.uint64)
    assert (words[:4] == words[4:]).all()
    counters = ((np.arange(block, dtype=np.uint64) * np.uint64(0x9E3779B1)) & np.uint64(0xFFFFFFFF)) + (
        np.uint64(high) << np.uint64(32))
    expected = np.stack(_philox_reference(seed, counters.astype(np.int64)))
    assert (words[:4] == expected).all()


@pytest.mark.parametrize("D", [8, 5], ids=["D-multiple-of-4", "D-odd"])
def test_noise_follows_the_documented_stream(device, D):
    """Every element's noise is the documented function of (seed, flat index), whatever the tiling;
    D = 5 takes the per-element path (groups of four straddle tokens)."""
    if not interpolate_module.use_triton(device):
        pytest.skip("Triton kernel not runnable here")
    M, L, seed, noise_std = 3, 6, 2**33 + 5, 0.5
    vectors = torch.randn(4, L, D, device=device)
    mask = torch.ones(4, L, dtype=torch.bool, device=device)
    anchors = torch.tensor([0, 3, 1], device=device)
    partners = torch.tensor([2, 3, 0], device=device)
    lam = torch.tensor([0.25, 1.0, 0.5], device=device)
    clean, _ = interpolate(vectors, mask, anchors, partners, lam)
    expected = torch.from_numpy(documented_noise(seed, (M, L, D)))
    # approximate sin/cos/log2 on a GPU, exact ones in the interpreter
    atol = 2e-4 if device.type == "cuda" else 2e-5
    for block_l, block_d in [(None, None), (1, 4), (2, 8), (8, 16)]:
        noisy, _ = interpolate_module._launch(vectors, mask, anchors, partners, lam, noise_std, seed,
                                              block_l=block_l, block_d=block_d)
        noise = (noisy - clean).double().cpu() / noise_std
        torch.testing.assert_close(noise, expected, atol=atol, rtol=1e-4)


def test_unchecked_out_of_range_index_gives_a_nan_row_not_a_bad_read(device):
    """On CUDA without value checks, indices are not read on the host: the kernel turns such a row into
    NaN with mask 0 and never reads outside ``vectors`` (the other rows are unaffected)."""
    if not interpolate_module.use_triton(device):
        pytest.skip("Triton kernel not runnable here")
    vectors, mask, anchors, partners, lam = make_inputs(4, 3, 8, 4, device=device)
    mask[:] = True
    bad_anchors = anchors.clone()
    bad_anchors[1] = 4
    bad_partners = partners.clone()
    bad_partners[2] = -1
    for noise_std in (0.0, 0.3):
        out, out_mask = interpolate_module._launch(vectors, mask, bad_anchors, bad_partners, lam, noise_std, 1)
        assert torch.isnan(out[1:3]).all() and not out_mask[1:3].any()
        good, good_mask = interpolate_module._launch(vectors, mask, anchors, partners, lam, noise_std, 1)
        assert torch.equal(out[[0, 3]], good[[0, 3]]) and torch.equal(out_mask[[0, 3]], good_mask[[0, 3]])


@pytest.mark.parametrize("checked", [True, False])
def test_value_checks_run_only_where_values_are_checked(monkeypatch, checked):
    """The index, lam and mask checks read the host (a sync on CUDA): they run only when
    _checks.values_checked says so (always on CPU; on CUDA when asked)."""
    calls = []
    monkeypatch.setattr(interpolate_module._checks, "values_checked", lambda value: checked)
    monkeypatch.setattr(interpolate_module, "_check_values", lambda *args: calls.append(args))
    interpolate(**good_inputs())
    assert len(calls) == (1 if checked else 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_synchronisation_on_cuda():
    inputs = make_inputs(6, 16, 64, 9, dtype=torch.bfloat16, mask_dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for noise_std in (0.0, 0.2):
            interpolate(*inputs, noise_std=noise_std, seed=4)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------------------ compiled for sm_90
@pytest.mark.parametrize("noise", [False, True], ids=["plain", "noise"])
def test_sm90_codegen_vectorised_without_spills(noise):
    """The benchmarked shape (4096 x 128 x 768 bf16), compiled for Hopper: 16-byte loads and stores of
    the vectors, no spills, no shuffle through shared memory, and few instructions per element (at 80%
    of H200's ~4.3 TB/s a bf16 element must cost under ~50 issue slots: 6 bytes per element, 132 SMs
    issuing 128 thread-instructions per clock)."""
    from sm90 import compile_sm90

    M, N, L, D = 4096, 4096, 128, 768
    block_l, block_d = interpolate_module.block_sizes(L, D, interpret=False)
    k = compile_sm90(
        interpolate_module._interpolate_kernel,
        dict(vectors_ptr="*bf16", mask_ptr="*u8", anchors_ptr="*i64", partners_ptr="*i64", lam_ptr="*fp32",
             out_ptr="*bf16", out_mask_ptr="*u8", N=N, L=L, D=D, stride_vn=L * D, stride_vl=D, stride_mn=L,
             stride_ml=1, noise_std=0.1, seed=12345),
        dict(ADD_NOISE=noise, GROUPED=True, WIDE_COUNTER=False, WIDE_ROW=False, GPU=True, BLOCK_L=block_l,
             BLOCK_D=block_d),
        num_warps=4)
    per_thread = block_l * block_d // (4 * 32)
    vectors_per_tile = per_thread // 8  # 8 bf16 per 16-byte vector
    assert k.ld_global.get(128, 0) == 2 * vectors_per_tile, k.summary()  # the anchor and partner rows
    assert k.st_global.get(128, 0) == vectors_per_tile, k.summary()
    assert max(bits for bits in k.st_global if bits != 128) <= 8, k.summary()  # else only the mask bytes
    assert k.n_spills == 0, k.summary()
    assert k.shared == 0 and k.count(r"^(ld|st)\.shared") == 0, k.summary()
    if k.sass_instructions:
        assert k.sass_instructions / per_thread < (40 if noise else 16), k.summary()
