"""Teacher outputs for real data, computed once and cached on disk.

The teacher is frozen, so its logits (and the hidden layers the alignment term reads) on the real
training and evaluation examples never change: one no-grad pass fills a file keyed by the teacher's
identity (its name and a hash of its weights), the data fingerprint, ``max_length`` and the cached
layers. Logits are kept in float32; hidden layers in float16, only when the loss aligns them.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import ModelError
from .checkpoint import CACHE_STALE_SECONDS, remove_stale_temporaries, save_atomic
from .config import check_folder

CACHE_FORMAT = 1


def model_identity(model: torch.nn.Module) -> str:
    """Name plus a hash of every parameter and buffer: two differently fine-tuned copies of the same
    hub model get different identities."""
    digest = hashlib.blake2b(digest_size=16)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    digest.update(str(name).encode())
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return f"{Path(str(name)).name or 'model'}-{digest.hexdigest()}"


def cache_key(teacher_identity: str, data_fingerprint: str, split: str, max_length: int, layers: Sequence[int]) -> str:
    parts = {"format": CACHE_FORMAT, "teacher": teacher_identity, "data": data_fingerprint, "split": split,
             "max_length": int(max_length), "layers": sorted(int(x) for x in layers)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


@torch.no_grad()
def compute(forward: Callable, encoded: dict, layers: Sequence[int], batch_size: int, device: torch.device,
            progress: bool = False, desc: str = "teacher") -> dict:
    """Run ``forward(batch) -> (logits [b, C], hidden_states tuple | None)`` over ``encoded`` in
    batches, keeping the logits (float32) and the requested hidden layers (float16) on the CPU."""
    from tqdm.auto import tqdm

    n = encoded["input_ids"].shape[0]
    logits, hidden = [], {int(k): [] for k in layers}
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        batch = {k: v[start:start + batch_size].to(device) for k, v in encoded.items()
                 if k in ("input_ids", "attention_mask", "token_type_ids")}
        batch_logits, hidden_states = forward(batch)
        logits.append(batch_logits.float().cpu())
        for k in hidden:
            hidden[k].append(hidden_states[k].to(torch.float16).cpu())
    return {"logits": torch.cat(logits), "hidden": {k: torch.cat(v) for k, v in hidden.items()}}


def check_finite(outputs: dict, teacher: str, split: str) -> dict:
    """``outputs`` when every logit is finite; otherwise a ModelError naming the teacher: a teacher
    whose fine-tuning diverged (NaN weights) predicts class 0 for every row through argmax, which
    looks like a plausible accuracy, and its NaN soft labels would make the student's loss NaN."""
    logits = outputs["logits"]
    bad = int((~torch.isfinite(logits)).any(-1).sum())
    if bad:
        raise ModelError(f"the teacher {teacher} gives non-finite logits (NaN or inf) on {bad} of the "
                         f"{logits.shape[0]} {split} examples: its weights are broken, as after a fine-tuning that "
                         "diverged. Fine-tune it again with a lower learning rate (sage-fast teacher --force --lr "
                         "..., or --teacher-lr for the teacher distill makes), or use another --teacher")
    return outputs


def load_or_compute(cache_dir: str | Path | None, key: str, make: Callable[[], dict], *,
                    teacher: str = "in use", split: str = "") -> tuple[dict, bool]:
    """The cached outputs under ``key``, or ``make()``'s, written for next time. Returns
    (outputs, whether they came from the cache). A damaged cache file is recomputed; outputs that are
    not finite are a ModelError naming ``teacher``, and never written."""
    if cache_dir is None:
        return check_finite(make(), teacher, split), False
    folder = check_folder("cache-dir", cache_dir)  # before the pass, not after
    path = folder / f"teacher-{key}.pt"
    # a killed writer's copy would stay there for ever
    remove_stale_temporaries(folder, "teacher-*.pt", older_than=CACHE_STALE_SECONDS)
    if path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored.get("format") == CACHE_FORMAT:
                return check_finite(stored["outputs"], teacher, split), True
        except ModelError:
            raise
        except Exception:  # noqa: BLE001 - a torn or foreign file is just a cache miss
            pass
    outputs = check_finite(make(), teacher, split)
    save_atomic({"format": CACHE_FORMAT, "outputs": outputs}, path)
    return outputs, False
