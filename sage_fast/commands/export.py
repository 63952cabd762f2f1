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


def run(args) -> int:
    from pathlib import Path

    import torch

    from ..errors import UsageError
    from ..train import require_transformers
    from ..train.config import check_folder
    from ..train.models import export_student, load_interface

    transformers = require_transformers()
    check_folder("--out", args.out)
    if args.max_length < 2:
        raise UsageError(f"--max-length must be at least 2 (room for the special tokens), got {args.max_length}")
    interface, tokenizer = load_interface(find_trained(args.checkpoint))
    interface.eval()
    out = export_student(interface, tokenizer, Path(args.out))
    batch = tokenizer(SAMPLE_TEXTS, padding="longest", truncation=True, max_length=args.max_length, return_tensors="pt")
    with torch.no_grad():
        trained = interface.student_forward(interface.embed(batch["input_ids"]), batch["attention_mask"],
                                            token_type_ids=batch.get("token_type_ids")).logits
        exported = transformers.AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
        again = exported(**batch).logits
    difference = float((again - trained).abs().max())
    print(f"exported to {out}  (max |logit difference| on {len(SAMPLE_TEXTS)} sentences: {difference:.2e})")
    return 0 if difference < 1e-3 else 1
