"""Metrics: one JSON object per line in ``metrics.jsonl``, wall-time accounting, and the final table."""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


class MetricsLog:
    """Records kept in memory (they go into checkpoints) and mirrored to a JSONL file.

    Nothing touches the file until the first record is logged: a run that fails before that (a
    resume from a damaged checkpoint, say) leaves the file as it was. The first record rewrites the
    file atomically, as the records given here (a resumed run's: its checkpoint's) plus itself, so
    lines written after the last checkpoint by an interrupted run do not appear twice; later ones are
    appended.
    """

    def __init__(self, path: str | Path | None, records: list[dict] | None = None):
        self.path = None if path is None else Path(path)  # None: in memory only (reading a finished run)
        self.records: list[dict] = list(records or [])
        self._written = False  # whether the file holds self.records yet

    def log(self, **record) -> dict:
        record = {k: _plain(v) for k, v in record.items()}
        self.records.append(record)
        if self.path is None:
            return record
        if not self._written:
            self._rewrite()
        else:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        return record

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The writer's process id in the name, as checkpoint.save_atomic does: see remove_stale_temporaries.
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.{os.getpid()}.", suffix=".tmp",
                                   dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._written = True

    def last(self, kind: str) -> dict | None:
        for record in reversed(self.records):
            if record.get("kind") == kind:
                return record
        return None


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null says "not available"
    return value


class Timer:
    """Accumulates wall time per category; ``total`` runs whenever training runs."""

    def __init__(self, seconds: dict[str, float] | None = None):
        self.seconds: dict[str, float] = dict(seconds or {})

    @contextmanager
    def measure(self, category: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[category] = self.seconds.get(category, 0.0) + time.perf_counter() - start

    def share(self, category: str, of: str = "train") -> float:
        total = self.seconds.get(of, 0.0)
        return self.seconds.get(category, 0.0) / total if total > 0 else 0.0


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format) — format like ``'{:.2%}'``; a missing value prints as '-'.
    The first column and columns of text are aligned left, columns of numbers right."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        line = []
        for key, _, fmt in columns:
            value = row.get(key)
            line.append("-" if value is None else fmt.format(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    left = [i == 0 or all(isinstance(row.get(key), (str, type(None))) for row in rows)
            for i, (key, _, _) in enumerate(columns)]
    out = []
    for n, r in enumerate(cells):
        out.append("  ".join(c.ljust(w) if left[i] else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def one_class_warning(counts, label_names: list[str], split: str, who: str) -> str | None:
    """A warning when a model predicted one class for every row of ``split`` (``counts``: how many
    rows it gave each class), else None. Accuracy alone hides it: a student stuck at the majority
    class scores that class's share, which can look like learning on unbalanced data."""
    counts = [int(c) for c in counts]
    used = [i for i, c in enumerate(counts) if c > 0]
    if len(counts) < 2 or len(used) != 1:
        return None
    name = label_names[used[0]] if used[0] < len(label_names) else str(used[0])
    return (f"{who} predicts one class ({name!r}) for every row of {split} ({counts[used[0]]} rows): it did not "
            "learn to tell the classes apart")


def notes(summary: dict) -> list[str]:
    """Every warning of a run, for the lines under its results table."""
    found = list(summary.get("warnings") or [])
    found += [row["warning"] for row in summary.get("modes", []) if row.get("warning")]
    return found
