"""The student behind the vector interface, with its loss, on the setup's data: what a mode
computes without an optimizer (evaluation, a profile pass, the teacher's labels), and the module
that DistributedDataParallel wraps."""
from __future__ import annotations

import contextlib
import copy
import inspect

import torch

from ..nn import SAGELoss
from ..regions import pooled_embedding
from ..synthesis import GeneratorInputs, label_in_chunks, profile_signal
from ..synthesis.pool import used_lengths
from .generator_inputs import generator_inputs
from .models import VectorInterface
from .setup import Setup, build_loss


def no_buffer_sync_per_forward(ddp_class) -> dict:
    """DDP's setting that stops it re-sending buffers before every forward: the student's buffers
    (position ids) never change in training. Newer torch names it ``forward_sync_buffers`` and
    warns on every rank, every mode, about the older ``broadcast_buffers``."""
    if "forward_sync_buffers" in inspect.signature(ddp_class.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}



class Student:
    """The student behind the vector interface, with its loss, on the setup's data: everything a
    mode computes without an optimizer (evaluation, a profile pass, the teacher's labels)."""

    def __init__(self, setup: Setup):
        self.setup, self.config, self.device = setup, setup.config, setup.device
        student = copy.deepcopy(setup.student_init)
        self.interface = VectorInterface(setup.teacher, student).to(self.device)
        self.loss_fn = build_loss(self.config, setup, student).to(self.device)
        self.n_train = setup.encoded["train"]["input_ids"].shape[0]
        # Tokens each training row uses, on the host: a step trims its batch's shared padding from
        # these, never from the device's masks (reading those back would make every step wait).
        self.lengths = used_lengths(setup.encoded["train"]["attention_mask"])
        self.predicted_counts = {}  # split -> rows predicted as each class at its last evaluation

    @property
    def autocast(self):
        """A new autocast context on each use: an autocast object keeps the state it restores on
        itself, so one shared by the training thread and a round's worker thread would mix them up."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the training device; on CUDA by a pinned, asynchronous copy, so the host
        goes on queueing work instead of waiting for the copy."""
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    @property
    def embedding_dim(self) -> int:
        return self.interface.student.config.hidden_size

    def parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer trains: the student, the adapter, the loss's projections."""
        return self.interface.trainable_parameters() + [p for p in self.loss_fn.parameters() if p.requires_grad]

    def state_dict(self) -> dict:
        return {"student": self.interface.student.state_dict(), "adapter": self.interface.adapter.state_dict(),
                "loss": self.loss_fn.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.interface.student.load_state_dict(state["student"])
        self.interface.adapter.load_state_dict(state["adapter"])
        self.loss_fn.load_state_dict(state["loss"])

    def real_batch(self, rows: torch.Tensor) -> dict:
        """Training rows ``rows`` (a host index) with their cached teacher outputs, on the device;
        ``width``: the most tokens any of them uses (a Python int)."""
        enc = self.setup.encoded["train"]
        cached = self.setup.teacher_outputs["train"]
        move = self.to_device
        batch = {
            "input_ids": move(enc["input_ids"][rows]), "mask": move(enc["attention_mask"][rows]),
            "labels": move(enc["labels"][rows]), "ids": move(enc["ids"][rows]),
            "logits": move(cached["logits"][rows]),
            "hidden": {k: move(v[rows]) for k, v in cached["hidden"].items()},
            "width": int(self.lengths[rows].max()),  # host tensors: no device read
        }
        if "token_type_ids" in enc:
            batch["token_type_ids"] = move(enc["token_type_ids"][rows])
        return batch

    def vectors_of(self, ids: torch.Tensor):
        """The synthesizer's view of real rows: teacher-space vectors ``[n, L, d_t]`` and masks."""
        rows = ids.cpu()  # example ids are positions in the encoded training split
        enc = self.setup.encoded["train"]
        return (self.interface.embed(enc["input_ids"][rows].to(self.device)),
                enc["attention_mask"][rows].to(self.device))

    @torch.no_grad()
    def label(self, vectors: torch.Tensor, mask: torch.Tensor):
        """The teacher's logits (float32) and cached hidden layers (float16) on synthetic vectors."""
        def forward(vectors, mask, output_hidden_states):
            with self.autocast:
                return self.interface.teacher_forward(vectors, mask, output_hidden_states=output_hidden_states)

        chunk = self.config.label_batch_size or self.config.eval_batch_size  # large rounds: large batches
        return label_in_chunks(forward, vectors, mask, self.setup.teacher_layers, chunk)

    def generator_inputs(self) -> GeneratorInputs:
        """What the synthesis generators read besides vectors: the training rows' tokens, the
        teacher's table, this student on vectors (boundary steps), the tokenizer's text."""
        return generator_inputs(self.interface, self.setup.tokenizer, self.setup.encoded["train"],
                                lambda: self.autocast, batch_size=self.config.eval_batch_size,
                                temperature=self.config.temperature)

    @torch.no_grad()
    def profile_batches(self):
        """``(ids, per-example loss, pooled embedding)`` for every training row, one no-grad pass
        in eval mode: what ``SAGESynthesizer.refresh`` takes."""
        n, step = self.n_train, self.config.eval_batch_size
        self.interface.eval()
        try:
            for start in range(0, n, step):
                real = self.real_batch(torch.arange(start, min(n, start + step)))
                width = real["width"]
                mask = real["mask"][:, :width]
                types = real.get("token_type_ids")
                with self.autocast:
                    out = self.interface.student_forward(self.interface.embed(real["input_ids"][:, :width]), mask,
                                                         output_hidden_states=True,
                                                         token_type_ids=None if types is None else types[:, :width])
                    teacher = {"logits": real["logits"],
                               "hidden_states": {k: v[:, :width].float() for k, v in real["hidden"].items()} or None}
                    result = self.loss_fn(out, teacher, labels=real["labels"], attention_mask=mask)
                signal = profile_signal(self.config.profile_signal, result.per_example.float(), out.logits,
                                        real["logits"], real["labels"], self.config.temperature)
                yield real["ids"], signal, pooled_embedding(out.hidden_states[-1], mask)
        finally:
            self.interface.train()

    @torch.no_grad()
    def evaluate(self, split: str) -> float:
        """Accuracy on a real split (validation or test); under several processes each rank counts
        its share of the rows and the counts are summed (every rank gets the same accuracy)."""
        enc = self.setup.encoded[split]
        device, world = self.device, self.setup.world
        self.interface.eval()
        correct = 0
        counts = torch.zeros(self.setup.data.num_labels, dtype=torch.long)
        n = enc["input_ids"].shape[0]
        share = world.share(n)
        for start in range(share.start, share.stop, self.config.eval_batch_size):
            sl = slice(start, min(share.stop, start + self.config.eval_batch_size))
            mask = enc["attention_mask"][sl].to(device)
            width = int(used_lengths(enc["attention_mask"][sl]).max())  # from the host copy
            types = enc["token_type_ids"][sl, :width].to(device) if "token_type_ids" in enc else None
            with self.autocast:
                out = self.interface.student_forward(self.interface.embed(enc["input_ids"][sl, :width].to(device)),
                                                     mask[:, :width], token_type_ids=types)
            predicted = out.logits.argmax(-1).cpu()
            correct += int((predicted == enc["labels"][sl]).sum())
            counts += torch.bincount(predicted, minlength=counts.numel())[:counts.numel()]
        self.interface.train()
        if world.distributed:
            correct = int(world.all_reduce_sum(torch.tensor([correct], device=device)).item())
            counts = world.all_reduce_sum(counts.to(device)).cpu()
        self.predicted_counts[split] = counts
        return correct / n


class StudentStep(torch.nn.Module):
    """The student's forward and the loss as one module: what DistributedDataParallel wraps, so the
    student, the adapter and the loss's projections are all-reduced together."""

    def __init__(self, interface: VectorInterface, loss_fn: SAGELoss):
        super().__init__()
        self.interface, self.loss_fn = interface, loss_fn

    def forward(self, vectors, mask, token_types, teacher_outputs, labels):
        out = self.interface.student_forward(vectors, mask, output_hidden_states=True, token_type_ids=token_types)
        return out, self.loss_fn(out, teacher_outputs, labels=labels, attention_mask=mask)

    def ignored_by_ddp(self) -> list[str]:
        """Names DDP must neither broadcast nor reduce: the frozen teacher (the same on every rank)
        and the student's own word table, which the vector interface never reads."""
        unused = {id(p) for p in self.interface.student.get_input_embeddings().parameters()}
        return [name for name, p in self.named_parameters(remove_duplicate=False)
                if name.startswith("interface.teacher.") or id(p) in unused] + \
               [name for name, _ in self.named_buffers() if name.startswith("interface.teacher.")]

