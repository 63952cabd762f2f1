"""Fine-tune a teacher on a task, once, and cache it.

``fine_tune_teacher`` takes a model with or without a task head (for example the packaged MiniLM
sentence encoder), trains it on the task's train split with AdamW (linear warm-up then linear decay,
cross-entropy) and saves it under ``<cache>/teachers/<key>`` (``<cache>`` is ``$SAGE_FAST_CACHE`` or
``~/.cache/sage_fast``). The key hashes the base model (a packaged one by its package and version,
not by where it is installed, so another checkout or environment reuses the teacher), the data
fingerprint and every hyperparameter, so a second call with the same inputs is a cache hit. The
folder is written to a temporary sibling and renamed, so an interrupted run never leaves a
half-written teacher. Metrics (validation and test accuracy, training time) are kept in
``sage_fast_teacher.json`` beside it.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .._checks import in_range, integer
from ..devices import resolve_device
from . import ModelError
from .checkpoint import CACHE_STALE_SECONDS, publish_folder, remove_stale_staging, staging_prefix
from .config import TEACHER_EPOCHS, TEACHER_LR, check_folder
from .data import Split, TaskData, encode

METRICS_FILE = "sage_fast_teacher.json"


@dataclass(frozen=True)
class TeacherSettings:
    epochs: float = TEACHER_EPOCHS
    batch_size: int = 32
    lr: float = TEACHER_LR
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_length: int = 48
    seed: int = 0

    def check(self) -> None:
        try:
            in_range("epochs", self.epochs, 0, math.inf, lo_open=True, hi_open=True)
            integer("batch_size", self.batch_size, minimum=1)
            in_range("lr", self.lr, 0, math.inf, lo_open=True, hi_open=True)
            in_range("weight_decay", self.weight_decay, 0, math.inf, hi_open=True)
            in_range("warmup_ratio", self.warmup_ratio, 0, 1, hi_open=True)
            integer("max_length", self.max_length, minimum=2)  # room for the special tokens
            integer("seed", self.seed, minimum=0)
        except ValueError as err:
            raise ModelError(str(err)) from None


def teachers_root(cache_dir=None) -> Path:
    from ..assets import cache_root

    return Path(cache_dir) if cache_dir is not None else cache_root() / "teachers"


def teacher_key(base: str, data: TaskData, settings: TeacherSettings) -> str:
    from ..assets import package_release
    from .models import resolve_model_path

    resolved = resolve_model_path(base)  # also says, before any work, when the model is missing
    return _key(base, package_release(base) or resolved, data, settings)


def _key(base: str, identity: str, data: TaskData, settings: TeacherSettings) -> str:
    values = asdict(settings)
    # The key names the warm-up share by its older name, so teachers cached before the rename stay hits.
    values["warmup_fraction"] = values.pop("warmup_ratio")
    payload = json.dumps({"base": identity, "data": data.fingerprint(), "settings": values}, sort_keys=True)
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(base).name or "model")
    return f"{stem}-{data.task}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


class TeacherDiverged(ModelError):
    """The teacher's fine-tuning gave a non-finite loss or non-finite weights; nothing was cached."""


def _cached(folder: Path) -> bool:
    return (folder / METRICS_FILE).is_file() and (folder / "config.json").is_file()


def _weights_finite(folder: Path) -> bool:
    """Whether every weight saved in ``folder`` is finite (a folder whose weights cannot be read is
    left to the loader, which says what is wrong with it)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        return True
    for path in folder.glob("*.safetensors"):
        try:
            tensors = load_file(str(path))
        except Exception:  # noqa: BLE001 - a damaged file is the loader's to report
            return True
        if not all(bool(t.isfinite().all()) for t in tensors.values() if t.is_floating_point()):
            return False
    return True


def _batches(encoded: dict, batch_size: int, order: torch.Tensor):
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = int(encoded["attention_mask"][rows].sum(1).max())  # trim the split-wide padding
        yield {key: (value[rows][:, :width] if value.dim() == 2 else value[rows]) for key, value in encoded.items()}


@torch.no_grad()
def accuracy(model, tokenizer, split: Split, *, max_length: int = 64, batch_size: int = 64, device="cpu") -> float:
    """Accuracy of a sequence classifier on a split, from text."""
    was_training = model.training
    model.eval()
    encoded = encode(split, tokenizer, max_length)
    correct = 0
    for batch in _batches(encoded, batch_size, torch.arange(len(split))):
        labels = batch.pop("labels").to(device)
        batch.pop("ids")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        correct += int((logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return correct / len(split)


def read_teacher_metrics(folder) -> dict:
    path = Path(folder) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def fine_tune_teacher(base: str, data: TaskData, *, settings: TeacherSettings | None = None, cache_dir=None,
                      device=None, force: bool = False, progress: bool = True, log=print) -> Path:
    """Fine-tune ``base`` on ``data.train`` (or reuse the cached result) and return its folder."""
    from tqdm.auto import tqdm

    from .models import load_classifier, load_tokenizer
    from .schedule import linear_schedule

    settings = settings or TeacherSettings()
    settings.check()
    root = check_folder("cache-dir", teachers_root(cache_dir))
    folder = root / teacher_key(base, data, settings)
    remove_stale_staging(root, log=log, what="teacher", older_than=CACHE_STALE_SECONDS)
    replace = force or folder.exists()  # a folder there but not used (damaged, diverged) is replaced
    if not force and _cached(folder):
        if _weights_finite(folder):
            log(f"teacher cache hit: {folder}")
            return folder
        log(f"the cached teacher {folder} holds non-finite weights (a fine-tuning that diverged); training it again")
    device = resolve_device(device)
    torch.manual_seed(settings.seed)
    tokenizer = load_tokenizer(base)
    model = load_classifier(base, data.num_labels).to(device).train()
    encoded = encode(data.train, tokenizer, settings.max_length)

    steps_per_epoch = math.ceil(len(data.train) / settings.batch_size)
    total_steps = max(1, math.ceil(settings.epochs * steps_per_epoch))
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (no_decay if parameter.dim() < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(parameter)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr)
    schedule = linear_schedule(optimizer, total_steps, settings.warmup_ratio)
    generator = torch.Generator().manual_seed(settings.seed)

    started = time.perf_counter()
    step = 0
    bar = tqdm(total=total_steps, desc=f"teacher {data.task}", unit="step", disable=not progress)
    while step < total_steps:
        for batch in _batches(encoded, settings.batch_size, torch.randperm(len(data.train), generator=generator)):
            if step == total_steps:
                break
            labels = batch.pop("labels").to(device)
            batch.pop("ids")
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            value = loss.item()  # read for the progress bar anyway
            if not math.isfinite(value):
                bar.close()
                _diverged(base, data, settings, f"the loss is {value} at step {step} of {total_steps}")
            bar.set_postfix(loss=f"{value:.3f}")
    bar.close()
    train_seconds = time.perf_counter() - started
    model.eval()
    if not all(bool(p.detach().isfinite().all()) for p in model.parameters()):
        _diverged(base, data, settings, "its weights hold non-finite values after training")
    metrics = {
        "base": base, "task": data.task, "settings": asdict(settings), "data_fingerprint": data.fingerprint(),
        "train_examples": len(data.train), "steps": total_steps, "train_seconds": round(train_seconds, 1),
        "validation_accuracy": accuracy(model, tokenizer, data.validation, max_length=settings.max_length, device=device),
        "test_accuracy": accuracy(model, tokenizer, data.test, max_length=settings.max_length, device=device),
        "label_names": data.label_names,
    }
    model.config.id2label = dict(enumerate(data.label_names))
    model.config.label2id = {name: i for i, name in enumerate(data.label_names)}
    _publish(model, tokenizer, metrics, folder, replace)
    log(f"teacher saved to {folder}: validation accuracy {metrics['validation_accuracy']:.4f}, "
        f"test accuracy {metrics['test_accuracy']:.4f}, trained in {train_seconds:.0f} s")
    return folder


def _publish(model, tokenizer, metrics: dict, folder: Path, replace: bool) -> None:
    """The teacher written to a staging folder beside ``folder`` and renamed into place
    (``replace``: over what is there), so a reader never sees a teacher half written."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=staging_prefix(folder)))
    try:
        model.cpu().save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
        publish_folder(staging, folder, replace=replace, keep=_cached)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _diverged(base: str, data: TaskData, settings: TeacherSettings, what: str):
    raise TeacherDiverged(f"fine-tuning the teacher {base} on {data.task} diverged: {what} (learning rate "
                          f"{settings.lr:g}); nothing was saved or cached. Train it with a lower learning rate "
                          "(sage-fast teacher --lr, or distill's --teacher-lr)")


__all__ = ["TeacherDiverged", "TeacherSettings", "accuracy", "fine_tune_teacher", "read_teacher_metrics", "teacher_key",
           "teachers_root"]
