"""The interpolation generator: ``lam * x_a + (1 - lam) * x_b`` token-wise over the anchor's and the
partner's vectors, mask ``m_a OR m_b``, optional seeded noise, in one launch of the fused
:func:`sage_fast.ops.interpolate`. Its rows lie between two rows the student already fits."""
from __future__ import annotations

from ...ops import interpolate
from .base import GeneratedRows, Generator, GeneratorInputs, check_vectors, unique_rows


class Interpolation(Generator):
    name = "interpolate"

    def generate(self, plan, vectors_of, label, inputs: GeneratorInputs) -> GeneratedRows:
        rows, anchors, partners = unique_rows(plan.anchor_ids, plan.partner_ids)
        vectors, mask = vectors_of(rows)
        check_vectors(vectors, mask, rows.shape[0])
        anchors, partners = anchors.to(vectors.device), partners.to(vectors.device)
        out, out_mask = interpolate(vectors, mask, anchors, partners, plan.lam.to(vectors.device).float(),
                                    noise_std=self.config.noise_std, seed=plan.noise_seed)
        return GeneratedRows(out, out_mask)
