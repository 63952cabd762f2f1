"""interpolate against torch gather + lerp + mask OR (eager and torch.compile), with and without noise;
and interpolate itself under torch.compile (fullgraph: the op is one custom-op call in the graph).

CUDA: SST-2-like pool shapes (M=8192 synthetic rows, L=64 tokens, d=768, bf16). CPU: smaller, fp32
(the op runs its plain-torch path there, so the CPU rows compare torch paths only).
Bytes moved: two gathered input rows and one output row per synthetic row, plus the masks.
"""
import pytest
import torch
from harness import DEVICE, compiled, measure, scaled

from sage_fast.ops import interpolate

if DEVICE.type == "cuda":
    N, M, L, D, DTYPE = 4096, scaled(8192), 64, 768, torch.bfloat16
else:
    N, M, L, D, DTYPE = 512, scaled(1024), 64, 128, torch.float32


def torch_interpolate(vectors, mask, anchors, partners, lam, noise_std, generator):
    out = torch.lerp(vectors[partners], vectors[anchors], lam.to(vectors.dtype)[:, None, None])
    out_mask = mask[anchors] | mask[partners]
    if noise_std > 0:
        noise = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
        out = out + noise_std * noise * out_mask[..., None]
    return out, out_mask


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    vectors = torch.randn(N, L, D, device=DEVICE).to(DTYPE)
    lengths = torch.randint(L // 4, L + 1, (N,), device=DEVICE)
    mask = torch.arange(L, device=DEVICE)[None, :] < lengths[:, None]
    anchors = torch.randint(0, N, (M,), device=DEVICE)
    partners = torch.randint(0, N, (M,), device=DEVICE)
    lam = torch.rand(M, device=DEVICE)
    return vectors, mask, anchors, partners, lam


@pytest.mark.parametrize("noise_std", [0.0, 0.1], ids=["plain", "noise"])
@pytest.mark.parametrize("impl", ["eager", "compile", "sage_fast", "sage_fast_compiled"])
def test_interpolate(benchmark, inputs, impl, noise_std):
    vectors, mask, anchors, partners, lam = inputs
    element = vectors.element_size()
    bytes_moved = 3 * M * L * D * element + 3 * M * L * mask.element_size() + M * (2 * 8 + 4)
    generator = torch.Generator(device=DEVICE).manual_seed(0)

    if impl == "sage_fast_compiled" and DEVICE.type != "cuda":
        pytest.skip("a GPU column: on the CPU the op is its torch path, which the compile column times")
    if impl.startswith("sage_fast"):
        def synthesise():
            return interpolate(vectors, mask, anchors, partners, lam, noise_std=noise_std, seed=1)

        fn = synthesise if impl == "sage_fast" else compiled(synthesise, fullgraph=True)
        if fn is None:
            pytest.skip("torch.compile is unavailable here")
    else:
        peer = torch_interpolate if impl == "eager" else compiled(torch_interpolate)
        if peer is None:
            pytest.skip("torch.compile is unavailable here")

        def fn():
            return peer(vectors, mask, anchors, partners, lam, noise_std, generator)

    if "compile" in impl:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - no working compiler backend: drop this peer
            pytest.skip(f"torch.compile failed here: {type(err).__name__}: {str(err)[:300]}")

    shape = f"M={M} L={L} d={D} {str(DTYPE).replace('torch.', '')}"
    measure(benchmark, f"interpolate {'+noise ' if noise_std else ''}{shape}", impl, fn,
            bytes_moved=bytes_moved, baseline=impl == "eager")
