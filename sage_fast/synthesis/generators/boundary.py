"""The boundary generator: from each anchor's vectors, a few bounded steps in the teacher's vector
space that increase the student's disagreement with the teacher, ``T^2 KL(p_t || p_s)`` at the
distillation temperature; the teacher then labels where they end. Rows pushed to where the student
is wrong about the teacher carry what the student has yet to learn, the idea of boundary-supporting
samples in knowledge distillation (Heo et al., AAAI 2019).

Each step takes the teacher's logits at the current point (a forward without gradients, held fixed
for the step) and one student forward and backward for the gradient of the disagreement with
respect to the vectors. The step moves every unmasked token along that gradient, scaled so that
the token with the largest gradient moves ``boundary_step_size`` times the anchor's mean token-vector
norm and every other token less: after ``boundary_steps`` steps no token is further than
``boundary_steps * boundary_step_size`` of that norm from where it started, so the rows stay near
the anchor in the scale of its own embeddings. Padding never moves.

The student is read as it was when the round's snapshot was taken: a round made beside training
steps on a frozen copy of it (``FrozenStudent``), so training goes on meanwhile and the rows are
the same whenever the worker runs. It is read in eval mode (no dropout, so no random number is
drawn from training's streams), and its parameters' gradients are left untouched. The partner
plays no part.
"""
from __future__ import annotations

import torch

from .base import GeneratedRows, Generator, GeneratorInputs, check_vectors, unique_rows


def disagreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[n]`` ``T^2 KL(softmax(t/T) || softmax(s/T))`` per row."""
    t = temperature
    log_p_t = torch.log_softmax(teacher_logits.float() / t, dim=-1)
    log_p_s = torch.log_softmax(student_logits.float() / t, dim=-1)
    return (t * t) * (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)


class Boundary(Generator):
    name = "boundary"
    needs = ("student", "student_forward")
    reads_student = True
    uses_partners = False

    def why_needed(self) -> str:
        return ("it steps along the student's gradient with respect to its input vectors, so the student must read "
                "the teacher's vectors (the vector interface); a loop whose student reads only token ids can use "
                "generator 'substitute' or 'interpolate'")

    def generate(self, plan, vectors_of, label, inputs: GeneratorInputs) -> GeneratedRows:
        rows, anchors, _ = unique_rows(plan.anchor_ids)
        vectors, mask = vectors_of(rows)
        check_vectors(vectors, mask, rows.shape[0])
        anchors = anchors.to(vectors.device)
        start, mask = vectors[anchors].float(), mask[anchors]
        out = torch.empty_like(start)
        step = max(1, int(inputs.batch_size))
        for first in range(0, start.shape[0], step):
            part = slice(first, first + step)
            out[part] = self.steps(start[part], mask[part], label, inputs)
        return GeneratedRows(out.to(vectors.dtype), mask)

    def steps(self, x0: torch.Tensor, mask: torch.Tensor, label, inputs: GeneratorInputs) -> torch.Tensor:
        """``x0`` [n, L, d] after ``boundary_steps`` steps (module docstring)."""
        keep = (mask != 0).unsqueeze(-1).to(x0.dtype)                       # [n, L, 1]
        tokens = keep.sum(dim=(1, 2)).clamp_min(1.0)
        scale = (x0.norm(dim=-1, keepdim=True) * keep).sum(dim=(1, 2)) / tokens  # [n] mean token-vector norm
        reach = self.config.boundary_step_size * scale
        x = x0.clone()
        for _ in range(self.config.boundary_steps):
            with torch.no_grad():
                teacher_logits = label(x, mask)[0].detach()
            with torch.enable_grad():
                point = x.detach().requires_grad_(True)
                loss = disagreement(inputs.student_logits(point, mask), teacher_logits, inputs.temperature)
                (gradient,) = torch.autograd.grad(loss.sum(), point)
            gradient = gradient.float() * keep
            largest = gradient.norm(dim=-1).amax(dim=1)                      # [n]
            # a row without gradient (a saturated student) stays where it is
            factor = torch.where(largest > 0, reach / largest.clamp_min(torch.finfo(torch.float32).tiny),
                                 torch.zeros_like(largest))
            x = x + factor.view(-1, 1, 1) * gradient
        return x.detach()
