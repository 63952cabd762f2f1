"""The package without triton (it is optional: macOS, Windows, a CPU-only install): ``import sage_fast``
and ``sage_fast.nn`` work, every op runs on CPU tensors through its plain-torch path, and CUDA tensors
get an ImportError naming the package to install. Runs in a fresh interpreter whose import system
refuses ``triton``, since this one has it loaded."""
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r'''
    import importlib.abc
    import sys


    class RefuseTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden for this test)", name=name)
            return None


    sys.meta_path.insert(0, RefuseTriton())

    import sage_fast
    import sage_fast.functional as F
    import sage_fast.nn
    import torch

    torch.manual_seed(0)
    assert "triton" not in sys.modules, "something imported triton"
    decision = sage_fast.decide("cpu")
    assert decision.backend == "torch", decision

    # kd_loss, forward and backward, against its float64 reference
    student = torch.randn(5, 7, requires_grad=True)
    teacher = torch.randn(5, 7)
    labels = torch.tensor([0, 3, 6, -100, 2])
    loss = F.kd_loss(student, teacher, labels, temperature=2.0, alpha=0.3)
    (grad,) = torch.autograd.grad(loss, student)
    student64 = student.detach().double().requires_grad_()
    ref = F.kd_loss_reference(student64, teacher.double(), labels, temperature=2.0, alpha=0.3)
    (ref_grad,) = torch.autograd.grad(ref, student64)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-5, rtol=1e-5)

    # align_loss over two layer pairs with a mask, forward and backward
    s = [torch.randn(3, 4, 6, requires_grad=True) for _ in range(2)]
    t = [torch.randn(3, 4, 6) for _ in range(2)]
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    loss = F.align_loss(s, t, mask, cosine_weight=0.5)
    grads = torch.autograd.grad(loss, s)
    s64 = [x.detach().double().requires_grad_() for x in s]
    ref = F.align_loss_reference(s64, [x.double() for x in t], mask, cosine_weight=0.5)
    ref_grads = torch.autograd.grad(ref, s64)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-5)

    # interpolate, without and with noise (seeded)
    vectors = torch.randn(4, 5, 8)
    vmask = torch.rand(4, 5) > 0.3
    anchors, partners, lam = torch.tensor([0, 3, 1]), torch.tensor([2, 3, 0]), torch.tensor([0.2, 1.0, 0.7])
    out, out_mask = F.interpolate(vectors, vmask, anchors, partners, lam)
    ref, ref_mask = F.interpolate_reference(vectors.double(), vmask, anchors, partners, lam)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(out_mask, ref_mask)
    noisy, _ = F.interpolate(vectors, vmask, anchors, partners, lam, noise_std=0.1, seed=3)
    again, _ = F.interpolate(vectors, vmask, anchors, partners, lam, noise_std=0.1, seed=3)
    assert torch.equal(noisy, again) and not torch.equal(noisy, out)

    # the nn module, through the same ops
    config = sage_fast.nn.SAGELossConfig(alpha=0.5, temperature=2.0)
    result = sage_fast.nn.SAGELoss(config)({"logits": student}, {"logits": teacher}, labels)
    assert torch.isfinite(result.loss)

    # CUDA tensors: a clear error naming the package, unless the plain-torch path is forced
    from sage_fast._backend import use_triton

    decision = sage_fast.decide("cuda")
    assert decision.backend == "unavailable" and "pip install triton" in decision.reason, decision
    try:
        use_triton("cuda")
    except ImportError as err:
        assert "pip install triton" in str(err), err
    else:
        raise AssertionError("no error for CUDA tensors without triton")
    with sage_fast.use_backend("torch"):
        assert use_triton("cuda") is False
    assert "triton" not in sys.modules, "something imported triton"
    print("ok")
''')


@pytest.mark.parametrize("interpret", ["0", "1"], ids=["plain", "TRITON_INTERPRET=1"])
def test_package_works_without_triton(tmp_path, monkeypatch, interpret):
    # TRITON_INTERPRET=1 asks for the kernels on CPU; without triton the torch path must still run
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    monkeypatch.delenv("SAGE_FAST_BACKEND", raising=False)
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("ok")


def test_the_script_can_fail(tmp_path):
    # the finder really hides triton: importing it in the same setup must fail
    script = SCRIPT.split("import sage_fast\n", 1)[0] + "import triton\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode != 0 and "hidden for this test" in done.stderr
