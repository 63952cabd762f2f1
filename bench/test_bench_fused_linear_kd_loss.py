"""fused_linear_kd_loss forward + backward against the eager composition (both heads' logits,
log-softmax, the divergence, cross-entropy) and Liger-Kernel's LigerFusedLinearJSDLoss.

Two groups, each with the same loss in every entry: forward KL + CE (eager, sage_fast) and the
generalized JSD (beta 0.5) + CE, TRL's and Liger's convention without the T^2 factor (eager,
sage_fast, Liger). Liger runs on the CPU too (``compiled=False`` there: torch.compile of its chunk
function is what it measures otherwise, and on the CPU that is a different program).

CPU: N = 4,096 tokens, V = 32,000, H = 512 for both models, float32 (scaled by
SAGE_FAST_BENCH_SCALE). CUDA: 16,384 tokens, a 128,256-token vocabulary, student H = 2,048 and
teacher H = 4,096 (the heads of a 1B and an 8B model), bfloat16.

The flops, the floor here: four GEMMs of N x V x H (both heads' logits, the student's hidden-state
and weight gradients), 8 N V H in all for H the same on both sides; the loss itself is a few passes
over N x V. Peak memory is what the ops allocate beyond the inputs.
"""
import pytest
import torch
import torch.nn.functional as F
from harness import DEVICE, measure, scaled

from sage_fast.ops import fused_linear_kd_loss

ALPHA, BETA = 0.5, 0.5

if DEVICE.type == "cuda":
    SHAPES = [(scaled(16384), scaled(128256, 64), 2048, 4096, torch.bfloat16)]
else:
    SHAPES = [(scaled(4096, 16), scaled(32000, 64), scaled(512, 16), scaled(512, 16), torch.float32)]


def eager(divergence):
    def loss(h, w, b, k, u, c, labels):
        s = F.linear(h, w, b).float()
        with torch.no_grad():
            t = F.linear(k, u, c).float()
        log_q = F.log_softmax(s, dim=-1)
        log_p = F.log_softmax(t, dim=-1)
        counted = labels != -100
        if divergence == "forward_kl":
            div = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
        else:
            log_m = torch.logsumexp(torch.stack([log_p + torch.log(torch.tensor(BETA)),
                                                 log_q + torch.log1p(torch.tensor(-BETA))]), dim=0)
            div = (BETA * F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1)
                   + (1 - BETA) * F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1))
        ce = F.cross_entropy(s, labels, reduction="none")
        per_row = torch.where(counted, ALPHA * div + (1 - ALPHA) * ce, 0.0)
        return per_row.sum() / counted.sum().clamp_min(1)

    return loss


def sage_fast(divergence):
    def loss(h, w, b, k, u, c, labels):
        return fused_linear_kd_loss(h, w, k, u, labels, student_bias=b, teacher_bias=c, alpha=ALPHA,
                                    divergence=divergence, beta=BETA, scale_by_t2=False)

    return loss


def liger():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        return None
    module = LigerFusedLinearJSDLoss(weight_hard_loss=1 - ALPHA, weight_soft_loss=ALPHA, beta=BETA,
                                     compiled=DEVICE.type == "cuda")

    def loss(h, w, b, k, u, c, labels):
        return module(h, w, k, u, labels, b, c)

    return loss


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}-{str(s[4]).replace('torch.', '')}")
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("impl", ["eager", "liger", "sage_fast"])
def test_fused_linear_kd_loss_forward_backward(benchmark, impl, divergence, shape):
    n, v, h_s, h_t, dtype = shape
    if impl == "liger" and divergence != "jsd":
        pytest.skip("Liger's fused-linear distillation loss is the JSD")
    loss_fn = {"eager": eager(divergence), "sage_fast": sage_fast(divergence),
               "liger": liger() if impl == "liger" else None}[impl]
    if loss_fn is None:
        pytest.skip("liger-kernel is not installed")
    torch.manual_seed(0)
    hidden = torch.randn(n, h_s, device=DEVICE, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(v, h_s, device=DEVICE) / h_s**0.5).to(dtype).requires_grad_(True)
    bias = torch.zeros(v, device=DEVICE, dtype=dtype).requires_grad_(True)
    teacher_hidden = torch.randn(n, h_t, device=DEVICE, dtype=dtype)
    teacher_weight = (torch.randn(v, h_t, device=DEVICE) / h_t**0.5).to(dtype)
    teacher_bias = torch.zeros(v, device=DEVICE, dtype=dtype)
    labels = torch.randint(0, v, (n,), device=DEVICE)
    labels[: n // 8] = -100  # a prompt's worth of tokens that count in nothing

    def fn():
        hidden.grad = weight.grad = bias.grad = None
        loss_fn(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels).backward()

    if DEVICE.type == "cuda":
        try:  # the eager composition's [N, V] float32 temporaries may not fit beside the 128k vocabulary
            fn()
        except torch.OutOfMemoryError:
            hidden.grad = weight.grad = bias.grad = None
            torch.cuda.empty_cache()
            pytest.skip(f"{impl} runs out of GPU memory at this shape")
    flops = 2.0 * n * v * (3 * h_s + h_t)
    group = f"fused_linear {divergence} fwd+bwd {n}x{v}x{h_s} {str(dtype).replace('torch.', '')}"
    measure(benchmark, group, impl, fn, flops=flops, baseline=impl == "eager")
