"""A SAGE training step never makes the host wait for the device.

On a GPU: one step (real rows, synthetic rows from the pool, the loss, backward, the optimizer, the
profile) under ``torch.cuda.set_sync_debug_mode("error")``, which raises at any synchronising call
(a read of a device value, a blocking copy). Without a GPU the same step runs on the CPU under a
torch-function mode that records every read of a tensor's value on the host (``item``, ``tolist``,
``bool``, ``int``, ``float``, ``torch.equal``, ...): on CUDA each of them would be a wait. Value
checks are switched to what CUDA does by default (off), and models get the 4-D attention mask they
get on CUDA."""
import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

pytest.importorskip("transformers")
pytest.importorskip("umap")

from sage_fast import _checks  # noqa: E402
from sage_fast.train import loop, models  # noqa: E402
from test_loop import make_tiny_task, tiny_config  # noqa: E402

HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
              torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy, torch.equal}
# Reads of tensors that live on the host on CUDA too (file, function): AdamW's step counts
# (capturable=False), the training rows' and the pool rows' used widths.
HOST_SIDE = {("optimizer.py", "_get_value"), ("student.py", "real_batch"), ("pool.py", "width_of")}


class HostReads(TorchFunctionMode):
    """Records each read of a tensor value on the host, with where it came from."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            frames = [f for f in traceback.extract_stack()[:-1] if "torch/overrides" not in f.filename]
            if (Path(frames[-1].filename).name, frames[-1].name) not in HOST_SIDE:
                self.reads.append(f"{func.__name__} at " + " <- ".join(
                    f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-4:])))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_task(tmp_path_factory.mktemp("tiny"))


def run_with_a_pool(tiny, out, device, **settings):
    """A SAGE run after 6 steps and one round: the pool has rows, so the next step mixes them in."""
    config = tiny_config(tiny, out, device=device, analysis_lag=0, **settings)
    setup = loop.build_setup(config, log=lambda *a: None)
    run = loop.ModeRun(setup, "sage", out / "sage", log=lambda *a: None)
    order = torch.randperm(run.n_train, generator=torch.Generator().manual_seed(0))
    for step in range(6):
        run.train_step(order[step * 16:(step + 1) * 16])
        run.global_step += 1
        run.session.end_step(run.global_step)  # a round after step 6, inline
    assert run.analysis_rounds == 1 and run.pool_size > 0
    return run, order[96:112]


@pytest.mark.parametrize("beta", [0.0, 0.5], ids=["kd", "kd+align"])
def test_a_sage_step_reads_nothing_back_from_the_device(tiny, tmp_path, monkeypatch, beta):
    run, rows = run_with_a_pool(tiny, tmp_path, "cpu", beta=beta)
    monkeypatch.setattr(_checks, "values_checked", lambda value: False)  # CUDA's default
    monkeypatch.setattr(models, "_full_mask", models.full_attention_mask)  # the mask CUDA gets
    with HostReads() as mode:
        loss = run.train_step(rows)
        run.session.end_step(7)  # the step's rows join the profile; no round is due
    assert mode.reads == []
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad


def test_the_detector_sees_host_reads(tiny, tmp_path):
    """The check above can fail: a step that reads the loss is caught."""
    with HostReads() as mode:
        float(torch.ones(2).sum())
        bool(torch.ones(2).all())
    assert len(mode.reads) == 2 and mode.reads[0].startswith("__float__ at test_no_sync.py")


def test_the_4d_mask_gives_the_model_the_same_outputs(tiny):
    """On CUDA models get the 4-D mask they would build themselves; the outputs do not change."""
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(tiny / "teacher")).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, model.config.hidden_size, generator=g)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    full = models.full_attention_mask(model, x, mask)
    assert full.dim() == 4
    with torch.no_grad():
        plain = model(inputs_embeds=x, attention_mask=mask, output_hidden_states=True)
        given = model(inputs_embeds=x, attention_mask=full, output_hidden_states=True)
    torch.testing.assert_close(given.logits, plain.logits, rtol=1e-6, atol=1e-6)
    for a, b in zip(given.hidden_states, plain.hidden_states):
        torch.testing.assert_close(a[mask.bool()], b[mask.bool()], rtol=1e-6, atol=1e-6)
    unpadded = torch.ones(3, 7, dtype=torch.long)  # where the model itself would pass no mask at all
    with torch.no_grad():
        given = model(inputs_embeds=x, attention_mask=models.full_attention_mask(model, x, unpadded)).logits
        torch.testing.assert_close(given, model(inputs_embeds=x, attention_mask=unpadded).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("beta", [0.0, 0.5], ids=["kd", "kd+align"])
def test_a_sage_step_on_cuda_never_synchronises(tiny, tmp_path, beta):
    run, rows = run_with_a_pool(tiny, tmp_path, "cuda", beta=beta)
    run.train_step(rows)  # warm-up: first-use work (kernel compilation, allocator growth) may synchronise
    _checks.check_values(False)
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        loss = run.train_step(rows)
        run.session.end_step(7)
        torch.cuda.set_sync_debug_mode("default")
    finally:
        torch.cuda.set_sync_debug_mode("default")
        _checks.check_values(None)
    assert loss.is_cuda and torch.isfinite(loss)
