import importlib

import pytest
import torch

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


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(interpolate_module, "_POISON_OUTPUTS", True)


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
