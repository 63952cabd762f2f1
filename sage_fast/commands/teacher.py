"""Fine-tune a teacher on a task and cache it (a second run with the same settings is a cache hit).

The base may have no task head (the packaged MiniLM sentence encoder, `minilm`): a fresh
classification head is added. The result lands in $SAGE_FAST_CACHE/teachers/<key> (default
~/.cache/sage_fast/teachers) with its tokenizer and a metrics file; its folder is printed last.
With the defaults (2,000 rotten-tomatoes snippets, two epochs; the same as the teacher `distill` makes)
it takes a few minutes on two CPU cores."""
from __future__ import annotations

from ..devices import DEVICE_HELP
from ..train.config import TEACHER_EPOCHS, TEACHER_LR
from ..train.data import add_data_arguments


def add_arguments(parser) -> None:
    parser.add_argument("--base", default="minilm",
                        help="model folder, Hugging Face id, or `minilm` / `mpnet` for the packaged offline models")
    add_data_arguments(parser, max_train_examples=2000, max_eval_examples=500)
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=float, default=TEACHER_EPOCHS,
                       help="passes over the training subset (may be fractional)")
    group.add_argument("--batch-size", type=int, default=32, help="examples per optimiser step")
    group.add_argument("--lr", type=float, default=TEACHER_LR, help="peak AdamW learning rate")
    group.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    group.add_argument("--warmup-ratio", type=float, default=0.1, help="share of the steps spent warming up the "
                                                                        "learning rate")
    group.add_argument("--max-length", type=int, default=48, help="tokens per example, padding and truncating")
    group.add_argument("--seed", type=int, default=0, help="training seed")
    group.add_argument("--cache-dir", default=None, help="folder for cached teachers (default: <cache>/teachers)")
    group.add_argument("--device", default="auto", help=DEVICE_HELP)
    group.add_argument("--force", action="store_true", help="train again even when the cache holds this teacher")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from ..devices import resolve_device
    from ..train.data import data_from_args

    device = resolve_device(args.device)  # before the data is read, and also on a cache hit
    from ..train.teacher import TeacherSettings, fine_tune_teacher, read_teacher_metrics

    settings = TeacherSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                               max_length=args.max_length, seed=args.seed)
    settings.check()  # with the device, before the data is read
    data = data_from_args(args)
    print(data.summary())
    folder = fine_tune_teacher(args.base, data, settings=settings, cache_dir=args.cache_dir, device=device,
                               force=args.force, progress=not args.no_progress)
    metrics = read_teacher_metrics(folder)
    if metrics:
        print(f"validation accuracy {metrics['validation_accuracy']:.4f}  test accuracy {metrics['test_accuracy']:.4f}  "
              f"({metrics['train_examples']} examples, {metrics['steps']} steps, {metrics['train_seconds']} s)")
        from ..train.label_identity import below_chance

        warning = below_chance(metrics.get("validation_accuracy"), data.num_labels, "validation", "the teacher")
        if warning:
            print(f"warning: {warning}")
    print(folder)
    return 0
