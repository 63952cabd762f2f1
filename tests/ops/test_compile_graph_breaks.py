"""torch.compile takes each op whole, forward and backward, and the compiled results equal eager ones.

``fullgraph=True`` turns any graph break into an error, so each test fails at the first one. The
compiler backend is "aot_eager": dynamo captures the graph (where breaks happen) and AOTAutograd
traces the backward, as they do for inductor, but no code is generated, so no C++ compiler is needed
and each op compiles in about a second on a CPU. Both paths are compiled: the plain-torch one, and the
Triton one, which on a CPU runs Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py):
each op is a ``torch.library`` custom op, so dynamo records one call of it instead of tracing into the
kernel launch, and the compiled step runs the same kernels as eager code.
"""
import importlib
import threading

import pytest
import torch

from sage_fast import use_backend
from sage_fast._backend import BACKENDS, requested_backend, triton_available
from sage_fast.ops import align_loss, interpolate, kd_loss

# the modules (their names in sage_fast.ops are the functions), for their launchers
align_module = importlib.import_module("sage_fast.ops.align_loss")
interpolate_module = importlib.import_module("sage_fast.ops.interpolate")
kd_module = importlib.import_module("sage_fast.ops.kd_loss")
# each op's Triton entry point, looked up by name at run time, so a counting stand-in sees every launch
LAUNCHERS = ((align_module, "_launch"), (interpolate_module, "_launch"), (kd_module, "_forward_triton"))

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


NEEDS_TRITON = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def count_launches(monkeypatch):
    """Counts the Triton launches of every op (one counter for all)."""
    count = [0]
    for module, name in LAUNCHERS:
        def counted(*args, _launch=getattr(module, name), **kwargs):
            count[0] += 1
            return _launch(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return count


LOSS_CASES = [
    pytest.param(kd, kd_inputs, "torch", id="kd_loss-torch"),
    pytest.param(kd, kd_inputs, "triton", id="kd_loss-triton", marks=NEEDS_TRITON),
    pytest.param(align, align_inputs, "torch", id="align_loss-torch"),
    pytest.param(align, align_inputs, "triton", id="align_loss-triton", marks=NEEDS_TRITON),
]


@pytest.mark.parametrize("op, make_inputs, backend", LOSS_CASES)
@pytest.mark.parametrize("reduction, backward", [("mean", backward_once), ("none", backward_twice)],
                         ids=["mean-backward", "none-kept-graph"])
def test_loss_compiles_whole_and_matches_eager(op, make_inputs, backend, reduction, backward, monkeypatch):
    torch.manual_seed(0)
    inputs = make_inputs()
    launches = count_launches(monkeypatch)
    with use_backend(backend):
        eager = backward(op, *inputs, reduction)
        before = launches[0]
        traced = backward(compiled(op), *inputs, reduction)
    # the compiled step ran the kernels (not a torch path chosen while tracing)
    assert (launches[0] > before) == (backend == "triton")
    for eager_value, traced_value in zip(eager, traced):
        torch.testing.assert_close(traced_value, eager_value)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=NEEDS_TRITON)])
@pytest.mark.parametrize("noise_std", [0.0, 0.5], ids=["no-noise", "noise"])
def test_interpolate_compiles_whole_and_matches_eager(noise_std, backend, monkeypatch):
    torch.manual_seed(0)
    launches = count_launches(monkeypatch)
    vectors = torch.randn(3, 4, 8)  # float32: the op takes no float64 vectors
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    anchors, partners, lam = torch.tensor([0, 1, 2]), torch.tensor([2, 0, 2]), torch.tensor([0.3, 0.7, 1.0])

    def synthesise(seed):
        return interpolate(vectors, mask, anchors, partners, lam, noise_std=noise_std, seed=seed)

    step = compiled(synthesise)
    with use_backend(backend):
        eager, traced = synthesise(5), step(5)
        other_seed, other_eager = step(6), synthesise(6)  # a new seed is not served the old seed's noise
    assert (launches[0] == 4) == (backend == "triton")  # the compiled calls ran the kernel too
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
