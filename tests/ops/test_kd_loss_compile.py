"""torch.compile takes kd_loss whole on its Triton path: the op is a torch.library custom op, so dynamo
records one node (shapes from its fake implementation) and neither traces the kernel launch nor the
autotuner's construction. ``fullgraph=True`` turns any graph break into an error. Where CI runs, the
Triton path is the interpreter on CPU tensors (TRITON_INTERPRET=1); on a GPU machine, the compiled
kernel. The compiler backend is "aot_eager", as in test_compile_graph_breaks.py: dynamo and
AOTAutograd (forward and backward graphs) without code generation."""
import pytest
import torch

from sage_fast import use_backend
from sage_fast.ops import kd_loss

pytestmark = [
    pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile is not supported here"),
    pytest.mark.usefixtures("cuda_by_default"),
]

CASES = {
    "classifier-mean": dict(shape=(5, 7), kw=dict(temperature=2.0, alpha=0.3)),
    "tokens-jsd-num-items": dict(shape=(2, 3, 11), kw=dict(divergence="jsd", beta=0.4, scale_by_t2=False,
                                                           soft_label_index=-1, num_items_in_batch=torch.tensor(4))),
    "tokens-reverse-none": dict(shape=(2, 3, 11), kw=dict(divergence="reverse_kl", alpha=0.6, reduction="none",
                                                          soft_label_index=-1)),
}


def inputs(shape):
    torch.manual_seed(0)
    student = torch.randn(shape, dtype=torch.float64)
    teacher = torch.randn(shape, dtype=torch.float64)
    labels = torch.randint(0, shape[-1], shape[:-1])
    labels.view(-1)[0] = -100
    labels.view(-1)[1] = -1
    labels.view(-1)[2] = -1
    if shape == (5, 7):
        labels[1] = labels[2] = 3  # no soft-label index in this case
    return student, teacher, labels


def step(fn, student, teacher, labels, kw):
    """The loss, the per-example losses and the student's gradient of (weight * loss).sum()."""
    s = student.clone().requires_grad_(True)
    loss, per_example = fn(s, teacher, labels, kw)
    weight = torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (loss * weight).sum().backward()
    return loss.detach(), per_example, s.grad


def call_kd_loss(student, teacher, labels, kw):
    return kd_loss(student, teacher, labels, return_per_example=True, **kw)


@pytest.mark.parametrize("case", list(CASES))
def test_triton_path_compiles_whole_and_matches_eager(case):
    shape, kw = CASES[case]["shape"], CASES[case]["kw"]
    student, teacher, labels = inputs(shape)
    compiled = torch.compile(call_kd_loss, backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    with use_backend("triton"):
        eager = step(call_kd_loss, student, teacher, labels, kw)
        traced = step(compiled, student, teacher, labels, kw)
    for eager_value, traced_value in zip(eager, traced):
        torch.testing.assert_close(traced_value, eager_value, rtol=1e-12, atol=1e-14)


def test_the_op_is_one_node_of_the_graph():
    # the graph dynamo captures holds the custom op, not the launch or its Python around it
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    student, teacher, labels = inputs((5, 7))
    torch._dynamo.reset()
    with use_backend("triton"):
        torch.compile(call_kd_loss, backend=backend, fullgraph=True)(student, teacher, labels, dict(alpha=0.5))
    assert len(graphs) == 1
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert sum(target in (torch.ops.sage_fast.kd_loss, torch.ops.sage_fast.kd_loss.default) for target in targets) == 1
