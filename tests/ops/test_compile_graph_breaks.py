"""torch.compile takes each op whole, forward and backward, and the compiled results equal eager ones.

``fullgraph=True`` turns any graph break into an error, so each test fails at the first one. The
compiler backend is "aot_eager": dynamo captures the graph (where breaks happen) and AOTAutograd
traces the backward, as they do for inductor, but no code is generated, so no C++ compiler is needed
and each op compiles in about a second on a CPU. The plain-torch path is forced: where CI runs
(``TRITON_INTERPRET=1``) CPU tensors would take Triton's interpreter, which dynamo cannot trace.
"""
import threading

import pytest
import torch

from sage_fast import use_backend
from sage_fast._backend import BACKENDS, requested_backend
from sage_fast.ops import align_loss, interpolate, kd_loss

pytestmark = pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(),
                                reason="torch.compile is not supported on this platform")


def compiled(fn):
    return torch.compile(fn, backend="aot_eager", fullgraph=True)


def kd(student, teacher, labels, reduction):
    return kd_loss(student, teacher, labels, temperature=2.0, alpha=0.3, reduction=reduction,
                   return_per_example=True)


def align(student, teacher, mask, reduction):
    return align_loss([student], [teacher], mask, mse_weight=1.0, cosine_weight=0.5, reduction=reduction,
                      return_per_example=True)


def kd_inputs():
    n, c = 5, 7
    labels = torch.randint(0, c, (n,))
    labels[0] = -100  # an ignored row
    return torch.randn(n, c, dtype=torch.float64), torch.randn(n, c, dtype=torch.float64), labels


def align_inputs():
    n, length, hidden = 3, 4, 8
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])  # an example without tokens, too
    return (torch.randn(n, length, hidden, dtype=torch.float64),
            torch.randn(n, length, hidden, dtype=torch.float64), mask)


def backward_twice(op, student, teacher, extra, reduction):
    """The op's outputs, and the student's gradient of ``(weight * loss).sum()`` from two backward
    passes through one kept graph: the second must find the gradient stored in forward as it was."""
    student = student.detach().clone().requires_grad_(True)
    loss, per_example = op(student, teacher, extra, reduction)
    weight = torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (first,) = torch.autograd.grad(loss, student, weight, retain_graph=True)
    (second,) = torch.autograd.grad(loss, student, weight)
    return loss.detach(), per_example, first, second


def backward_once(op, student, teacher, extra, reduction):
    """The op's outputs and ``loss.backward()``'s gradient: the usual training step, where the stored
    gradient is handed over without a copy in eager mode."""
    student = student.detach().clone().requires_grad_(True)
    loss, per_example = op(student, teacher, extra, reduction)
    loss.backward()
    return loss.detach(), per_example, student.grad


@pytest.mark.parametrize("op, make_inputs", [(kd, kd_inputs), (align, align_inputs)], ids=["kd_loss", "align_loss"])
@pytest.mark.parametrize("reduction, backward", [("mean", backward_once), ("none", backward_twice)],
                         ids=["mean-backward", "none-kept-graph"])
def test_loss_compiles_whole_and_matches_eager(op, make_inputs, reduction, backward):
    torch.manual_seed(0)
    inputs = make_inputs()
    with use_backend("torch"):
        eager = backward(op, *inputs, reduction)
        traced = backward(compiled(op), *inputs, reduction)
    for eager_value, traced_value in zip(eager, traced):
        torch.testing.assert_close(traced_value, eager_value)


@pytest.mark.parametrize("noise_std", [0.0, 0.5], ids=["no-noise", "noise"])
def test_interpolate_compiles_whole_and_matches_eager(noise_std):
    torch.manual_seed(0)
    vectors = torch.randn(3, 4, 8)  # float32: the op takes no float64 vectors
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    anchors, partners, lam = torch.tensor([0, 1, 2]), torch.tensor([2, 0, 2]), torch.tensor([0.3, 0.7, 1.0])

    def synthesise(seed):
        return interpolate(vectors, mask, anchors, partners, lam, noise_std=noise_std, seed=seed)

    step = compiled(synthesise)
    with use_backend("torch"):
        eager, traced = synthesise(5), step(5)
        other_seed, other_eager = step(6), synthesise(6)  # a new seed is not served the old seed's noise
    torch.testing.assert_close(traced[0], eager[0])
    assert torch.equal(traced[1], eager[1])
    torch.testing.assert_close(other_seed[0], other_eager[0])
    if noise_std > 0:
        assert not torch.allclose(other_seed[0], traced[0])


def backend_index(x):
    """The backend requested where it runs, as a number a compiled graph can return."""
    return x + BACKENDS.index(requested_backend())


def test_compiled_function_follows_the_use_backend_block_around_each_call():
    # the compiled code holds the decision it was traced with; a guard on the forced backend makes a
    # call under another one compile again instead of reusing it
    step = compiled(backend_index)
    x = torch.zeros(())
    with use_backend("torch"):
        assert int(step(x)) == BACKENDS.index("torch")
    with use_backend("auto"):
        assert int(step(x)) == BACKENDS.index("auto")


def test_use_backend_inside_a_compiled_function_applies_to_its_block_only():
    def inside_and_after(x):
        with use_backend("torch"):
            inside = backend_index(x)
        return inside, backend_index(x)

    with use_backend("auto"):
        inside, after = compiled(inside_and_after)(torch.zeros(()))
        assert requested_backend() == "auto"
    assert (int(inside), int(after)) == (BACKENDS.index("torch"), BACKENDS.index("auto"))


def test_use_backend_in_one_thread_leaves_compiled_calls_in_another_unforced(monkeypatch):
    monkeypatch.delenv("SAGE_FAST_BACKEND", raising=False)
    step = compiled(backend_index)
    seen = []
    with use_backend("torch"):
        worker = threading.Thread(target=lambda: seen.append(int(step(torch.zeros(())))))
        worker.start()
        worker.join()
        assert int(step(torch.zeros(()))) == BACKENDS.index("torch")
    assert seen == [BACKENDS.index("auto")]
