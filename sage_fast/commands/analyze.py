"""Draw the loss map of a trained student: refresh its error profile with one no-grad pass over the
training data, fit the loss-region analysis (kNN graph, UMAP to 2-D, region scores), and write a PNG
where each training example is a point coloured by its loss, with the anchors a SAGE round would
pick. Give a run folder (its main mode is used), a mode folder, or a checkpoint file."""
from __future__ import annotations

from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("path", metavar="CHECKPOINT_OR_RUN_DIR",
                        help="a run folder (from sage-fast distill), one of its mode folders, or a checkpoint.pt")
    parser.add_argument("--output", metavar="PNG", default=None,
                        help="where to write the picture (default: loss_map_analyze.png beside the checkpoint)")
    parser.add_argument("--device", default=None,
                        help="where to run the pass and the analysis (default: the run's own setting)")
    parser.add_argument("--anchors", type=int, default=None,
                        help="anchors to mark on the map (default: the run's synthetic-per-round)")


def find_checkpoint(path: Path) -> Path:
    from ..cli import UsageError
    from ..train.checkpoint import CHECKPOINT_NAME

    if path.is_file():
        return path
    if (path / CHECKPOINT_NAME).is_file():
        return path / CHECKPOINT_NAME
    config_file = path / "config.json"
    if config_file.is_file():
        import json

        mode = json.loads(config_file.read_text()).get("mode", "sage")
        if (path / mode / CHECKPOINT_NAME).is_file():
            return path / mode / CHECKPOINT_NAME
    found = sorted(path.glob(f"*/{CHECKPOINT_NAME}")) if path.is_dir() else []
    if found:
        return found[0]
    raise UsageError(f"no checkpoint at {path}: give a run folder written by sage-fast distill, one of its mode "
                     f"folders, or a {CHECKPOINT_NAME} file")


def run(args) -> int:
    import torch

    from ..cli import UsageError
    from ..train import checkpoint
    from ..train.config import DistillConfig
    from ..train.loop import ModeRun, build_setup

    path = find_checkpoint(Path(args.path))
    try:
        state = checkpoint.load(path)
    except checkpoint.CheckpointError as err:
        raise UsageError(f"{err}; it may be damaged (an interrupted copy) or from another program: give a "
                         "checkpoint.pt written by sage-fast distill, or run the distillation again") from None
    config = DistillConfig.from_dict(state["config"], source=str(path))
    config.progress = False
    if args.device is not None:
        config.device = args.device
    config.validate()
    if args.anchors is not None and args.anchors < 1:
        raise UsageError(f"--anchors must be a positive integer, got {args.anchors}")
    setup = build_setup(config, log=lambda *a: None)
    mode_run = ModeRun(setup, state["mode"], path.parent, log=print, read_only=True)
    mode_run.load(state)
    mode_run.refresh_profile()
    analyzer, _ = mode_run.fit_analyzer(config.seed)
    anchors, partners, lam = analyzer.sample_pairs(args.anchors or config.synthetic_per_round,
                                          torch.Generator(device=setup.device).manual_seed(config.seed))
    from ..plot import loss_map

    output = Path(args.output) if args.output else path.parent / "loss_map_analyze.png"
    output.parent.mkdir(parents=True, exist_ok=True)
    written = loss_map(analyzer, output, synthetic=(anchors, partners, lam), anchors=anchors,
                       title=f"{state['mode']} student after {state['global_step']} steps (refreshed profile)")
    losses = mode_run.profile.loss
    print(f"{state['mode']} student after {state['global_step']} steps: {mode_run.n_train} training examples, "
          f"mean loss {float(losses.mean()):.4f}, region-score threshold {float(analyzer.threshold_):.4f}")
    print(f"loss map written to {written or output}")
    return 0
