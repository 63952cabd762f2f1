"""Draw the loss map of a trained student: refresh its error profile with one no-grad pass over the
training data, fit the loss-region analysis (kNN graph, UMAP to 2-D, region scores), and write a PNG
where each training example is a point coloured by its loss, with the anchors a SAGE round would
pick. Give a run folder (its main mode is used), a mode folder, or a checkpoint file. No optimizer
and no synthetic pool are built: the student and the synthesizer's analysis are all it needs."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UsageError

def add_arguments(parser) -> None:
    parser.add_argument("path", metavar="CHECKPOINT_OR_RUN_DIR",
                        help="a run folder (from sage-fast distill), one of its mode folders, or a checkpoint.pt")
    parser.add_argument("--output", metavar="PNG", default=None,
                        help="where to write the picture (default: loss_map_analyze.png beside the checkpoint)")
    parser.add_argument("--device", default=None,
                        help="where to run the pass and the analysis (default: the run's own setting)")
    parser.add_argument("--anchors", type=int, default=None,
                        help="anchors to mark on the map (default: the run's synthetic-per-round)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show progress bars")


def find_checkpoint(path: Path) -> Path:
    from ..train.checkpoint import CHECKPOINT_NAME

    if path.is_file():
        return path
    if (path / CHECKPOINT_NAME).is_file():
        return path / CHECKPOINT_NAME
    config_file = path / "config.json"
    if config_file.is_file():
        mode = json.loads(config_file.read_text()).get("mode", "sage")
        if (path / mode / CHECKPOINT_NAME).is_file():
            return path / mode / CHECKPOINT_NAME
    found = sorted(path.glob(f"*/{CHECKPOINT_NAME}")) if path.is_dir() else []
    if found:
        return found[0]
    raise UsageError(f"no checkpoint at {path}: give a run folder written by sage-fast distill, one of its mode "
                     f"folders, or a {CHECKPOINT_NAME} file")


def run(args) -> int:
    # The driver (torch, transformers) loads here rather than at the top: every sage-fast command
    # imports this module to build its parser, and --help must stay fast.
    from tqdm.auto import tqdm

    from ..assets import cache_root
    from ..regions import use_compilation_cache
    from ..synthesis import SAGESynthesizer
    from ..train import checkpoint
    from ..train.config import DistillConfig
    from ..train.setup import build_setup, synthesis_config
    from ..train.student import Student

    use_compilation_cache(cache_root() / "numba")
    path = find_checkpoint(Path(args.path))
    try:
        state = checkpoint.load(path)
    except checkpoint.CheckpointError as err:
        raise UsageError(f"{err}; it may be damaged (an interrupted copy) or from another program: give a "
                         "checkpoint.pt written by sage-fast distill, or run the distillation again") from None
    if args.anchors is not None and args.anchors < 1:
        raise UsageError(f"--anchors must be a positive integer, got {args.anchors}")
    config = DistillConfig.from_dict(state["config"], source=str(path))
    config.progress = args.progress
    if args.device is not None:
        config.device = args.device
    config.validate()
    setup = build_setup(config, log=lambda *a: None)
    student = Student(setup)
    student.load_state_dict(state)
    # Mode sage whatever the run's mode: the map shows where a SAGE round would synthesise.
    synthesizer = SAGESynthesizer(synthesis_config(config, "sage", setup.device), num_examples=student.n_train,
                                  embedding_dim=student.embedding_dim, inputs=student.generator_inputs())
    batches = tqdm(student.profile_batches(), total=-(-student.n_train // config.eval_batch_size),
                   desc="error profile", unit="batch", disable=not args.progress)
    synthesizer.refresh(batches)
    plan = synthesizer.plan(count=args.anchors or config.synthetic_per_round, step=state["global_step"])
    if plan is None:
        raise UsageError(f"the run has {student.n_train} training examples; the analysis needs at least "
                         f"{synthesizer.config.min_examples}")
    output = Path(args.output) if args.output else path.parent / "loss_map_analyze.png"
    written = synthesizer.plot(plan, output, title=f"{state['mode']} student after {state['global_step']} steps "
                                                   "(refreshed profile)")
    print(f"{state['mode']} student after {state['global_step']} steps: {student.n_train} training examples, "
          f"mean loss {float(synthesizer.profile.loss.mean()):.4f}, region-score threshold {plan.threshold:.4f}")
    print(f"loss map written to {written}")
    return 0
