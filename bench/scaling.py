"""How each stage of a SAGE run grows with the number of training examples N: per-stage times.

    OMP_NUM_THREADS=1 python bench/scaling.py                       # writes docs/results/scaling_cpu.json
    OMP_NUM_THREADS=1 python bench/scaling.py --sizes 1000,2000 --no-models   # a quick look
    python bench/scaling.py --table docs/results/scaling_cpu.json  # the tables of docs/scaling.md

Stages that depend on N, timed at each size on clustered points of width ``--dim`` (pooled student
embeddings, like the kNN and regions suites use), ``k = --neighbours``:

- ``knn_exact``: ``knn_graph`` (tiled GEMM + top-k + exact re-ranking);
- ``knn_approximate``: pynndescent's NN-descent graph (what the CPU analysis takes from 8,192 points);
- ``umap``: the analyzer's UMAP given the exact graph, seeded as the synthesizer seeds it;
- ``region_scores``: the 2-D map's kNN, the region scores, their quantile and the anchor probabilities;
- ``draw``: ``sample_pairs`` of one round's rows;
- ``snapshot``: the seen rows of a full ``ErrorProfile`` copied for a round;
- ``observe`` / ``observe_decay``: one step's profile update (batch ``--batch``), running mean and
  decaying mean.

Stages that do not depend on N, timed once at the driver's default shapes (``--synthetic`` rows of
``--length`` tokens of the teacher's width): ``synthesis`` (the teacher's table lookup of the rows
the pairs use, then ``interpolate``), ``labelling`` (the packaged MiniLM-L6 teacher's forward on the
synthetic rows, in chunks of the driver's evaluation batch) and ``train_step`` (a 2-layer student made
from it: forward, SAGE loss, backward, clipping, AdamW, on ``--batch`` rows). ``--no-models`` skips
the last two.

Each stage is timed with ``harness.time_call`` (process CPU time, median of several runs when one
run is short, a single run when it is long), after the analysis warm-up, so numba's compilations are
not in any time. For each N-dependent stage the JSON holds the growth exponent ``a`` of a
least-squares fit ``t = c N^a`` over all sizes and over the three largest. The CPU numbers are upper
bounds whose growth with N is the point; ``docs/scaling.md`` reads them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

# One thread everywhere (torch, BLAS, numba), set before any of them is imported: the times are
# single-thread CPU times, comparable across stages and runs on a shared machine.
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
os.environ.pop("TRITON_INTERPRET", None)  # the CPU path is timed, not the interpreter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from harness import DEVICE, _fmt_time, time_call  # noqa: E402

from sage_fast.ops import interpolate  # noqa: E402
from sage_fast.regions import ErrorProfile  # noqa: E402
from sage_fast.regions import analyzer as analyzer_module  # noqa: E402
from sage_fast.regions.analyzer import LossRegionAnalyzer  # noqa: E402
from sage_fast.regions.knn import knn_graph  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# One run of a stage that takes at least this long is its time; shorter ones take the median of REPS.
SINGLE_RUN_SECONDS = 1.0
REPS = 5
FIXED_EPOCHS = 200


def clustered_points(n: int, dim: int, seed: int = 0):
    """``n`` points around 64 overlapping centres, each centre with its own loss level. The centres
    are close enough (0.4 of the spread) for the kNN graph to be connected, as for sentence
    embeddings that form a continuum; well-separated clusters would split UMAP's spectral
    initialisation into one small problem per component and time something else."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(64, dim, generator=g) * 0.4
    cluster = torch.randint(0, 64, (n,), generator=g)
    x = centres[cluster] + torch.randn(n, dim, generator=g)
    losses = torch.rand(64, generator=g)[cluster] + 0.1 * torch.rand(n, generator=g)
    return x.to(DEVICE), losses.to(DEVICE)


def timed(fn) -> dict:
    """Seconds of ``fn()``: one run when it is long, else the median of ``REPS`` after it."""
    first = time_call(fn, warmup=0, rep=1)
    if first >= SINGLE_RUN_SECONDS:
        return {"seconds": first, "runs": 1}
    return {"seconds": time_call(fn, warmup=0, rep=REPS), "runs": REPS}


def growth_exponent(sizes, seconds) -> float:
    """Slope of the least-squares line through ``(log N, log t)``."""
    xs, ys = [math.log(n) for n in sizes], [math.log(t) for t in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def n_dependent_stages(n: int, args) -> dict:
    x, losses = clustered_points(n, args.dim)
    k = args.neighbours
    times = {"knn_exact": timed(lambda: knn_graph(x, k))}
    times["knn_approximate"] = timed(lambda: analyzer_module._approximate_knn(x, k, 0))

    # UMAP alone, given the exact graph, as ``fit`` runs it (the synthesizer seeds every round).
    fitted = LossRegionAnalyzer(n_neighbors=k, quantile=args.quantile, random_state=0)
    fitted.knn_distances_, fitted.knn_indices_ = knn_graph(x, k)
    times["umap"] = timed(lambda: fitted._umap(x))
    # umap-learn runs 500 optimisation epochs up to 10,000 points and 200 above: a fixed count
    # shows the growth without that step.
    fixed_epochs = LossRegionAnalyzer(n_neighbors=k, random_state=0, umap_kwargs={"n_epochs": FIXED_EPOCHS})
    fixed_epochs.knn_distances_, fixed_epochs.knn_indices_ = fitted.knn_distances_, fitted.knn_indices_
    times[f"umap_{FIXED_EPOCHS}_epochs"] = timed(lambda: fixed_epochs._umap(x))
    components = graph_components(fitted.knn_indices_)
    fitted = fitted.fit(x, losses)  # the same UMAP, now with every attribute the later stages read

    def region_scores():
        _, neighbours = analyzer_module._map_knn(fitted.embedding_2d_, k)
        score = losses[neighbours].mean(dim=1)
        return analyzer_module._anchor_probability(score, analyzer_module._quantile(score, args.quantile))

    times["region_scores"] = timed(region_scores)
    generator = torch.Generator(DEVICE).manual_seed(0)
    times["draw"] = timed(lambda: fitted.sample_pairs(args.synthetic, generator))

    ids = torch.randint(0, n, (args.batch,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    for name, decay in (("observe", None), ("observe_decay", 0.1)):
        profile = ErrorProfile(n, args.dim, DEVICE, decay=decay)
        profile.update(torch.arange(n, device=DEVICE), losses, x)  # every row seen once
        batch_losses, batch_embeddings = losses[ids], x[ids]
        times[name] = timed(lambda: profile.update(ids, batch_losses, batch_embeddings))

    def snapshot():
        seen = profile.seen.nonzero().squeeze(1)
        return seen, profile.embedding[seen], profile.loss[seen]

    times["snapshot"] = timed(snapshot)
    return times, components


def graph_components(indices: torch.Tensor) -> int:
    """Connected components of the kNN graph (as an undirected graph)."""
    import numpy as np
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    n, k = indices.shape
    rows = np.repeat(np.arange(n), k)
    adjacency = csr_matrix((np.ones(n * k), (rows, indices.cpu().numpy().ravel())), shape=(n, n))
    return int(connected_components(adjacency, directed=False)[0])


def model_stages(args) -> dict:
    """Synthesis, labelling and one training step with the packaged MiniLM-L6 teacher and a 2-layer
    student made of every third of its layers (the driver's offline default pair)."""
    from sage_fast.assets import minilm_path
    from sage_fast.nn import SAGELoss, SAGELossConfig
    from sage_fast.train.models import VectorInterface, load_classifier, student_from_teacher

    torch.manual_seed(0)
    teacher = load_classifier(str(minilm_path()), 2).to(DEVICE)
    student = student_from_teacher(teacher, every_k=3).to(DEVICE)
    interface = VectorInterface(teacher, student).to(DEVICE)
    vocabulary = teacher.get_input_embeddings().num_embeddings
    m, length = args.synthetic, args.length
    g = torch.Generator().manual_seed(0)

    # A round's pairs touch at most 2m real rows; the teacher's table turns their tokens into vectors.
    real_ids = torch.randint(1000, vocabulary, (2 * m, length), generator=g).to(DEVICE)
    real_mask = (torch.arange(length)[None, :] < torch.randint(length // 4, length + 1, (2 * m, 1), generator=g))
    real_mask = real_mask.to(DEVICE)
    anchors, partners = torch.arange(m, device=DEVICE), torch.arange(m, 2 * m, device=DEVICE)
    lam = torch.rand(m, generator=g).to(DEVICE)

    def synthesis():
        return interpolate(interface.embed(real_ids), real_mask, anchors, partners, lam)

    times = {"synthesis": {**timed(synthesis), "rows": m, "length": length, "width": interface.teacher_dim}}
    vectors, mask = synthesis()

    @torch.no_grad()
    def labelling():
        for start in range(0, m, args.label_chunk):
            interface.teacher_forward(vectors[start:start + args.label_chunk], mask[start:start + args.label_chunk])

    times["labelling"] = {**timed(labelling), "rows": m, "length": length, "chunk": args.label_chunk}

    loss_fn = SAGELoss(SAGELossConfig(num_student_layers=student.config.num_hidden_layers,
                                      num_teacher_layers=teacher.config.num_hidden_layers)).to(DEVICE)
    parameters = interface.trainable_parameters()
    optimizer = torch.optim.AdamW(parameters, lr=5e-5)
    batch_vectors, batch_mask = vectors[:args.batch], mask[:args.batch]
    teacher_outputs = {"logits": torch.randn(args.batch, 2, generator=g).to(DEVICE), "hidden_states": None}
    labels = torch.randint(0, 2, (args.batch,), generator=g).to(DEVICE)

    def train_step():
        interface.train()
        out = interface.student_forward(batch_vectors, batch_mask, output_hidden_states=True)
        result = loss_fn(out, teacher_outputs, labels=labels, attention_mask=batch_mask)
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times["train_step"] = {**timed(train_step), "rows": args.batch, "length": length}
    # What a data-parallel step all-reduces: the parameters that receive a gradient (the student's
    # own word-embedding table gets none: it is fed vectors through the adapter).
    out = interface.student_forward(batch_vectors, batch_mask, output_hidden_states=True)
    loss_fn(out, teacher_outputs, labels=labels, attention_mask=batch_mask).loss.backward()
    times["parameters"] = {"teacher": sum(p.numel() for p in teacher.parameters()),
                           "teacher_table": teacher.get_input_embeddings().weight.numel(),
                           "student_with_gradient": sum(p.numel() for p in parameters if p.grad is not None)}
    optimizer.zero_grad(set_to_none=True)
    return times


STAGE_TITLES = {"knn_exact": "kNN exact", "knn_approximate": "kNN NN-descent", "umap": "UMAP (default epochs)",
                f"umap_{FIXED_EPOCHS}_epochs": f"UMAP ({FIXED_EPOCHS} epochs)", "region_scores": "region scores",
                "draw": "draw", "snapshot": "snapshot", "observe": "observe", "observe_decay": "observe (decay)"}


def markdown_tables(record: dict) -> str:
    """The tables of ``docs/scaling.md`` from a results record: times by N, then the exponents."""
    stages = record["stages"]
    names = [name for name in STAGE_TITLES if name in stages]
    sizes = stages[names[0]]["N"]
    lines = ["| N | " + " | ".join(STAGE_TITLES[name] for name in names) + " |",
             "| ---: | " + " | ".join("---:" for _ in names) + " |"]
    for i, n in enumerate(sizes):
        lines.append(f"| {n:,} | " + " | ".join(_fmt_time(stages[name]["seconds"][i]) for name in names) + " |")
    lines += ["", "| stage | a, all sizes | a, three largest |", "| --- | ---: | ---: |"]
    for name in names:
        upper = stages[name]["exponent_largest_three"]
        lines.append(f"| {STAGE_TITLES[name]} | {stages[name]['exponent']:.2f} | "
                     + ("" if upper is None else f"{upper:.2f}") + " |")
    fixed = {name: t for name, t in record.get("fixed", {}).items() if "seconds" in t}
    if fixed:
        lines += ["", "| stage (independent of N) | shape | time |", "| --- | --- | ---: |"]
        for name, t in fixed.items():
            shape = f"{t['rows']} rows x {t['length']} tokens" + (f" x {t['width']}" if "width" in t else "")
            lines.append(f"| {name.replace('_', ' ')} | {shape} | {_fmt_time(t['seconds'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,2000,5000,10000,20000,40000", help="values of N, comma-separated")
    parser.add_argument("--dim", type=int, default=384, help="embedding width")
    parser.add_argument("--neighbours", type=int, default=10, help="k of the kNN graph and the map (the driver's default)")
    parser.add_argument("--quantile", type=float, default=0.7, help="region-score quantile (the driver's default)")
    parser.add_argument("--synthetic", type=int, default=256, help="synthetic rows per round")
    parser.add_argument("--length", type=int, default=48, help="tokens per row")
    parser.add_argument("--batch", type=int, default=32, help="rows per training step and per profile update")
    parser.add_argument("--label-chunk", type=int, default=128, help="rows per teacher forward when labelling")
    parser.add_argument("--no-models", action="store_true", help="skip labelling and the training step")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / f"scaling_{DEVICE.type}.json")
    parser.add_argument("--table", type=Path, metavar="JSON", help="print the markdown tables of a results file and stop")
    args = parser.parse_args(argv)
    if args.table is not None:
        print(markdown_tables(json.loads(args.table.read_text())))
        return 0
    sizes = sorted(int(s) for s in args.sizes.split(","))
    if DEVICE.type == "cpu":
        torch.set_num_threads(1)

    started = time.perf_counter()
    # numba's compilations (or loading them from disk) out of every time: umap-learn's, pynndescent's
    analyzer_module.warm_up()
    analyzer_module._approximate_knn(*clustered_points(256, args.dim)[:1], args.neighbours, 0)
    by_size, components = {}, {}
    for n in sizes:
        by_size[n], components[n] = n_dependent_stages(n, args)
        print(f"N={n:>7}: " + ", ".join(f"{name} {_fmt_time(t['seconds'])}" for name, t in by_size[n].items()),
              flush=True)
    stages = {}
    for name in by_size[sizes[0]]:
        seconds = [by_size[n][name]["seconds"] for n in sizes]
        stages[name] = {"N": sizes, "seconds": seconds, "runs": [by_size[n][name]["runs"] for n in sizes],
                        "exponent": growth_exponent(sizes, seconds),
                        "exponent_largest_three": growth_exponent(sizes[-3:], seconds[-3:]) if len(sizes) >= 3 else None}
    fixed = {} if args.no_models else model_stages(args)
    for name, t in fixed.items():
        if "seconds" in t:
            print(f"{name}: {_fmt_time(t['seconds'])}", flush=True)

    record = {
        "what": "per-stage times of a SAGE run against the number of training examples N (bench/scaling.py)",
        "date": datetime.date.today().isoformat(),
        "device": str(DEVICE),
        "clock": "process CPU time" if os.environ.get("SAGE_FAST_BENCH_CLOCK") != "wall" else "wall clock",
        "threads": {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")},
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": _versions(),
        "settings": {"dim": args.dim, "neighbours": args.neighbours, "quantile": args.quantile,
                     "synthetic": args.synthetic, "length": args.length, "batch": args.batch,
                     "label_chunk": args.label_chunk},
        "knn_graph_components": components,
        "stages": stages,
        "fixed": fixed,
        "wall_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"growth exponents (t ~ N^a, all sizes / three largest):")
    for name, stage in stages.items():
        upper = stage["exponent_largest_three"]
        print(f"  {name:<16} {stage['exponent']:5.2f}" + ("" if upper is None else f" / {upper:5.2f}"))
    print(f"wrote {args.out} ({record['wall_seconds']:.0f} s)")
    return 0


def _versions() -> dict:
    from importlib import metadata

    versions = {}
    for package in ("torch", "umap-learn", "pynndescent", "numba", "scipy", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


if __name__ == "__main__":
    sys.exit(main())
