"""kd_loss gives TRL's and Liger-Kernel's numbers: TRL's ``generalized_jsd_loss`` (GKD) and Liger's
``LigerFusedLinearJSDLoss`` (chunked, runs on CPU), both without the T^2 factor, with padding and
prompt tokens labelled -100 left out of every term and of the mean. float32, to 1e-5, loss and
gradient, through the Triton kernel (the interpreter on CPU) and the torch path."""
import warnings

import pytest
import torch

from sage_fast import use_backend
from sage_fast.ops.kd_loss import kd_loss

BACKENDS = ("triton", "torch")
BETAS = [0.0, 0.5, 1.0]  # forward KL, the JSD, reverse KL in TRL's convention

pytestmark = pytest.mark.usefixtures("cuda_by_default")


@pytest.fixture(scope="module")
def generalized_jsd_loss():
    pytest.importorskip("trl")
    try:
        with warnings.catch_warnings():  # GKD lives under trl.experimental, which warns on import
            warnings.simplefilter("ignore")
            from trl.experimental.gkd.gkd_trainer import GKDTrainer
    except ImportError:  # older trl releases kept GKD among the stable trainers
        from trl.trainer.gkd_trainer import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


def token_batch(batch=2, length=7, vocab=33, scale=2.0):
    """[B, T, V] logits of a student and a teacher, and labels with a masked prompt and padding."""
    student = torch.randn(batch, length, vocab) * scale
    teacher = torch.randn(batch, length, vocab) * scale
    labels = torch.randint(0, vocab, (batch, length))
    labels[0, :2] = -100  # prompt
    labels[1, -3:] = -100  # padding
    return student, teacher, labels


def grad_of(loss_fn, student):
    s = student.clone().requires_grad_(True)
    loss = loss_fn(s)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_trl_generalized_jsd(generalized_jsd_loss, backend, beta, temperature, seed):
    student, teacher, labels = token_batch()
    trl_loss, trl_grad = grad_of(
        lambda s: generalized_jsd_loss(s, teacher, labels, beta=beta, temperature=temperature), student)

    def ours(s):
        with use_backend(backend):
            return kd_loss(s, teacher, labels, temperature=temperature, divergence="jsd", beta=beta,
                           scale_by_t2=False, reduction="batchmean")

    loss, grad = grad_of(ours, student)
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_items", [23, "tensor"])
def test_matches_trl_with_num_items_in_batch(generalized_jsd_loss, backend, num_items):
    torch.manual_seed(0)
    student, teacher, labels = token_batch()
    num_items = torch.tensor(23) if num_items == "tensor" else num_items
    trl_loss, trl_grad = grad_of(
        lambda s: generalized_jsd_loss(s, teacher, labels, beta=0.5, temperature=2.0,
                                       num_items_in_batch=num_items), student)

    def ours(s):
        with use_backend(backend):
            return kd_loss(s, teacher, labels, temperature=2.0, divergence="jsd", beta=0.5, scale_by_t2=False,
                           num_items_in_batch=num_items)

    loss, grad = grad_of(ours, student)
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature, alpha", [(1.0, 0.5), (2.0, 0.7)])
def test_matches_liger_fused_linear_jsd(backend, beta, temperature, alpha, seed):
    chunked_loss = pytest.importorskip("liger_kernel.chunked_loss")
    n, hidden, vocab = 14, 8, 33
    student_hidden = torch.randn(n, hidden)
    teacher_hidden = torch.randn(n, 6)
    student_weight, teacher_weight = torch.randn(vocab, hidden), torch.randn(vocab, 6)
    labels = torch.randint(0, vocab, (n,))
    labels[[0, 5, 6]] = -100
    liger = chunked_loss.LigerFusedLinearJSDLoss(weight_hard_loss=1.0 - alpha, weight_soft_loss=alpha, beta=beta,
                                                 temperature=temperature, compiled=False)

    def gradients(loss_fn):
        h = student_hidden.clone().requires_grad_(True)
        w = student_weight.clone().requires_grad_(True)
        loss = loss_fn(h, w)
        return (loss.detach(), *torch.autograd.grad(loss, (h, w)))

    expected = gradients(lambda h, w: liger(h, w, teacher_hidden, teacher_weight, labels))

    def ours(h, w):
        with use_backend(backend):
            return kd_loss(h @ w.t(), teacher_hidden @ teacher_weight.t(), labels, temperature=temperature,
                           alpha=alpha, divergence="jsd", beta=beta, scale_by_t2=False)

    for got, want in zip(gradients(ours), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
