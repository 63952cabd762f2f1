"""Why does (or doesn't) loss-aware synthesis help? Measurements of SAGE's premises on a trained run.

SAGE pays only if three things hold on the data at hand:

1. **The loss has regions.** A row's loss must be predictable from its neighbours' on the student's
   map; otherwise "the high-loss regions" are scattered points, and anchors drawn there are no
   better targeted than uniform ones. Measured: the rank correlation between each row's own loss
   and its region score (the mean loss of its k map neighbours, itself excluded, as the analyzer
   scores), the same in the pooled embedding space, and how many of the hardest 30% of rows lie in
   the top 30% of regions (30% if regions say nothing; 100% if they say everything).
2. **The teacher is right where the student is wrong.** Synthetic rows carry the teacher's labels,
   so they can only teach what the teacher knows. Measured: the teacher's accuracy against the gold
   labels among the student's hardest rows against all rows.
3. **Synthetic rows carry information the student lacks.** Measured at the end of training: the
   teacher's confidence on the pool's rows against real rows, and the student's disagreement with
   the teacher there (``T^2 KL(p_t || p_s)`` at the run's temperature): if the student already
   agrees with the teacher on synthetic rows, they teach nothing more.

Usage (a run folder of ``sage-fast distill`` with a ``sage`` or ``random`` mode; the teacher
outputs must be in the cache, as they are after the run)::

    python bench/sage_diagnostics.py runs/accuracy_study/runs/n2k-often/sage-seed0 [...more runs]
        [--json docs/results/diagnostics.json]

Every number comes from the run's checkpoint (its final profile and pool), its trained student and
the cached teacher outputs; nothing is trained.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

TOP = 0.3  # "hardest" rows and "top" regions: the analyzer's default anchor quantile is 0.7


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho (ranks by argsort; ties are rare in float losses)."""
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def top_overlap(own: torch.Tensor, region: torch.Tensor, share: float = TOP) -> float:
    """Of the rows whose own loss is in the top ``share``, the fraction whose region score is too."""
    n = own.shape[0]
    k = max(1, int(round(share * n)))
    hard = set(own.topk(k).indices.tolist())
    top_regions = set(region.topk(k).indices.tolist())
    return len(hard & top_regions) / k


def diagnose(run_dir: Path) -> dict:
    from sage_fast.regions import LossRegionAnalyzer
    from sage_fast.regions.knn import knn_graph
    from sage_fast.train import checkpoint
    from sage_fast.train.config import DistillConfig
    from sage_fast.train.setup import build_setup
    from sage_fast.train.models import load_interface

    config = DistillConfig().updated(json.loads((run_dir / "config.json").read_text()), source=str(run_dir))
    config.device, config.progress = "cpu", False
    mode = config.mode
    state = checkpoint.load(run_dir / mode)
    synth = state["synthesizer"]
    if synth is None:
        raise SystemExit(f"{run_dir}: mode {mode} keeps no profile (run the diagnostics on a sage or random run)")
    profile = synth["profile"]
    seen = profile["count"] > 0
    ids = seen.nonzero().squeeze(1)
    loss, emb = profile["loss"][ids].double(), profile["embedding"][ids].float()

    # 1. regions: the analyzer as the run configured it, on the final profile
    analyzer = LossRegionAnalyzer(n_neighbors=config.n_neighbors, quantile=config.quantile,
                                  random_state=config.seed).fit(emb, loss.float())
    region = analyzer.region_score_.double()
    _, neighbours = knn_graph(emb, config.n_neighbors)  # the row itself excluded, as in the map
    embedding_region = loss[neighbours].mean(dim=1)

    # 2. the teacher against the gold labels, by the student's loss
    setup = build_setup(config, log=lambda *a: None)
    gold = setup.encoded["train"]["labels"][ids]
    teacher_logits = setup.teacher_outputs["train"]["logits"][ids].float()
    teacher_right = (teacher_logits.argmax(-1) == gold).double()
    k = max(1, int(round(TOP * ids.shape[0])))
    hardest = loss.topk(k).indices

    # 3. the pool against real rows, at the end of training
    interface, _ = load_interface(run_dir / mode / "trained")
    interface.eval()
    pool = synth["pool"]
    size = int(pool["size"]) if "size" in pool else pool["vectors"].shape[0]
    t = config.temperature

    def disagreement(vectors, mask, teacher):
        with torch.no_grad():
            student = interface.student_forward(vectors.float(), mask).logits.float()
        log_t = torch.log_softmax(teacher / t, -1)
        return float(((t * t) * (log_t.exp() * (log_t - torch.log_softmax(student / t, -1))).sum(-1)).mean())

    def confidence(logits):
        return float(torch.softmax(logits.float(), -1).max(-1).values.mean())

    real_rows = ids[torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(0))[:size]]
    enc = setup.encoded["train"]
    real_vectors = interface.embed(enc["input_ids"][real_rows])
    real_teacher = setup.teacher_outputs["train"]["logits"][real_rows].float()
    pool_vectors, pool_mask, pool_logits = pool["vectors"][:size], pool["masks"][:size], pool["logits"][:size]

    return {
        "run": run_dir.name, "experiment": run_dir.parent.name, "mode": mode, "rows": int(ids.shape[0]),
        "step": state["global_step"],
        "loss_vs_map_region_rho": rank_correlation(loss, region),
        "loss_vs_embedding_region_rho": rank_correlation(loss, embedding_region),
        "hardest_in_top_regions": top_overlap(loss, region),
        "hardest_in_top_embedding_regions": top_overlap(loss, embedding_region),
        "teacher_accuracy_all": float(teacher_right.mean()),
        "teacher_accuracy_hardest": float(teacher_right[hardest].mean()),
        "teacher_confidence_real": confidence(real_teacher),
        "teacher_confidence_synthetic": confidence(pool_logits),
        "disagreement_real": disagreement(real_vectors, enc["attention_mask"][real_rows], real_teacher),
        "disagreement_synthetic": disagreement(pool_vectors, pool_mask, pool_logits.float()),
        "pool_rows": size,
    }


COLUMNS = [("experiment", "{}"), ("run", "{}"), ("rows", "{}"), ("loss_vs_map_region_rho", "{:.2f}"),
           ("loss_vs_embedding_region_rho", "{:.2f}"), ("hardest_in_top_regions", "{:.0%}"),
           ("teacher_accuracy_all", "{:.1%}"), ("teacher_accuracy_hardest", "{:.1%}"),
           ("teacher_confidence_real", "{:.2f}"), ("teacher_confidence_synthetic", "{:.2f}"),
           ("disagreement_real", "{:.3f}"), ("disagreement_synthetic", "{:.3f}")]


def table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in results:
        lines.append("| " + " | ".join(fmt.format(r[name]) for name, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of sage-fast distill (sage or random mode)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    results = [diagnose(run) for run in args.runs]
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
