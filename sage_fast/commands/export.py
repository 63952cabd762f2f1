"""Export a trained student as a standard Hugging Face model that reads text.

The checkpoint folder is one written during training (student, adapter, teacher location,
tokenizer). A linear adapter is folded into the student's word-embedding table over the teacher's
vocabulary, and the teacher's tokenizer is saved beside it, so
AutoModelForSequenceClassification.from_pretrained(OUT) and AutoTokenizer.from_pretrained(OUT)
give the logits seen in training. The export is checked by running both on a few sentences."""
from __future__ import annotations

SAMPLE_TEXTS = ["a warm, funny and beautifully acted film.", "tedious and far too long.", "it is a movie."]


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="a trained student folder (runs/<stamp>/<mode>/trained, as printed at the "
                                           "end of sage-fast distill), or the run or mode folder that holds it")
    parser.add_argument("--out", required=True, help="folder to write the exported model into")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per sentence in the check")


def find_trained(path):
    """The folder with the saved interface: ``path`` itself, ``path/trained`` (a mode folder), or
    ``path/<main mode>/trained`` (a run folder); otherwise a usage error saying what to give."""
    import json
    from pathlib import Path

    from ..errors import UsageError
    from ..train.models import INTERFACE_FILE

    path = Path(path)
    candidates = [path, path / "trained"]
    if (path / "config.json").is_file():
        try:
            mode = json.loads((path / "config.json").read_text()).get("mode", "sage")
        except ValueError:
            mode = "sage"
        candidates.append(path / str(mode) / "trained")
    for folder in candidates:
        if (folder / INTERFACE_FILE).is_file():
            return folder
    raise UsageError(f"{path} is not a trained student: give the folder sage-fast distill printed after "
                     "'next: sage-fast export' (runs/<stamp>/<mode>/trained), or the run or mode folder holding it")


# Files that mark a folder as one sage-fast needs: a run's, a mode's, a trained student's, a cached
# teacher's. An export replaces its --out folder whole, so it must never be one of them.
NEEDED_FILES = ("config.yaml", "results.json", "checkpoint.pt", "metrics.jsonl", ".sage-fast.lock",
                "sage_fast_interface.json", "sage_fast_teacher.json", "trained")


def check_destination(out, trained, record: dict):
    """``out`` (a Path) when an export may replace it: a new path, an empty folder, or an earlier
    export; a UsageError when it is (or holds) the trained student or its teacher, or a folder a
    run, mode or teacher needs, or any other folder whose files would be lost."""
    from pathlib import Path

    from ..errors import UsageError

    out = Path(out)
    target = out.resolve()
    teacher = Path(record.get("teacher", ""))
    needed = [(Path(trained).resolve(), "the trained student it exports")]
    if teacher.is_absolute():
        needed.append((teacher.resolve(), "the teacher that student was trained with"))
    for folder, what in needed:
        if target == folder or target in folder.parents:
            raise UsageError(f"--out {out} is or holds {what} ({folder}); the export replaces its --out folder "
                             "whole: give a new folder")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    found = [name for name in NEEDED_FILES if (out / name).exists()]
    found += [p.name for p in out.iterdir() if p.is_dir() and (p / "checkpoint.pt").is_file()]
    if found:
        raise UsageError(f"--out {out} is a folder sage-fast needs (it holds {', '.join(found)}: a run, mode, trained "
                         "student or cached teacher); the export replaces its --out folder whole: give a new folder, "
                         "such as a 'student' folder inside it")
    if not (out / "config.json").is_file():
        raise UsageError(f"--out {out} already holds files and is not an earlier export; the export replaces its "
                         "--out folder whole, so they would be lost: give a new or empty folder")
    return out


def run(args) -> int:
    import shutil
    import tempfile
    from pathlib import Path

    import torch

    from ..errors import UsageError
    from ..train import require_transformers
    from ..train.checkpoint import publish_folder, remove_stale_staging, staging_prefix
    from ..train.config import check_folder
    from ..train.models import export_student, load_interface, read_interface_record

    transformers = require_transformers()
    check_folder("--out", args.out)
    if args.max_length < 2:
        raise UsageError(f"--max-length must be at least 2 (room for the special tokens), got {args.max_length}")
    trained = find_trained(args.checkpoint)
    out = check_destination(Path(args.out), trained, read_interface_record(trained))
    interface, tokenizer = load_interface(trained)
    interface.eval()
    # Written beside --out and renamed into place once checked: a kill or a full disk during a
    # re-export leaves the previous export whole.
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out.parent, out.name, log=print, what="export")
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=staging_prefix(out)))
    try:
        export_student(interface, tokenizer, staging)
        batch = tokenizer(SAMPLE_TEXTS, padding="longest", truncation=True, max_length=args.max_length,
                          return_tensors="pt")
        with torch.no_grad():
            trained_logits = interface.student_forward(interface.embed(batch["input_ids"]), batch["attention_mask"],
                                                       token_type_ids=batch.get("token_type_ids")).logits
            exported = transformers.AutoModelForSequenceClassification.from_pretrained(
                staging, local_files_only=True).eval()
            again = exported(**batch).logits
        difference = float((again - trained_logits).abs().max())
        if difference >= 1e-3:
            print(f"the export does not give the trained student's logits (max |logit difference| on "
                  f"{len(SAMPLE_TEXTS)} sentences: {difference:.2e}); {out} was left as it was")
            return 1
        publish_folder(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    print(f"exported to {out}  (max |logit difference| on {len(SAMPLE_TEXTS)} sentences: {difference:.2e})")
    return 0
