"""Every setting of a distillation run, in one dataclass.

Precedence: the defaults below < a YAML/JSON file (``--config``) < flags given on the command line.
The resolved config is saved beside the results (``config.json`` and ``config.yaml``), so a run can
be repeated with ``sage-fast distill --config runs/NAME/config.yaml``.

The defaults are the offline quick run: the packaged MiniLM-L6 teacher fine-tuned on Rotten
Tomatoes, a 2-layer student made of every 3rd teacher layer, sized to finish in a few minutes on
two CPU cores.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..devices import DEVICE_HELP, DeviceError, check_device
from ..errors import UsageError
from .data import TASKS

MODES = ("sage", "kd", "random", "inverse")
# The synthesis session's own choices, repeated so that reading a config imports no torch (a test keeps them equal).
POOL_POLICIES = ("fifo", "reservoir")
PARTNERS = ("neighbours", "boundary", "same-label")
PROFILE_SIGNALS = ("loss", "disagreement", "trusted")
GENERATORS = ("interpolate", "substitute", "boundary")
# The names transformers.TrainingArguments gives some settings: read as flags and config keys too.
TRAINING_ARGUMENTS_NAMES = {"learning_rate": "lr", "num_train_epochs": "epochs",
                            "gradient_accumulation_steps": "grad_accumulation", "logging_steps": "log_every"}


class ConfigError(UsageError, ValueError):
    """A setting that cannot work; the message names the setting and what was expected."""


def _bad(name: str, expected: str, got) -> ConfigError:
    return ConfigError(f"{name.replace('_', '-')} must be {expected}, got {got!r}")


def _opt(default, help: str, **extra):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


# One set of defaults for fine-tuning a teacher, whether `sage-fast teacher` makes it or `distill` does.
TEACHER_EPOCHS = 2.0
TEACHER_LR = 2e-4


@dataclass
class DistillConfig:
    # --- models ---
    teacher: str | None = _opt(None, "teacher classifier: a hub id or a local folder; unset means the packaged "
                               "MiniLM-L6 fine-tuned on the task (cached after the first run)")
    student: str = _opt("from-teacher:3", "student: a hub id, a local folder, a config.json, or 'from-teacher:K' "
                        "(every K-th teacher layer, weights copied from the teacher)")
    teacher_epochs: float = _opt(TEACHER_EPOCHS, "epochs of fine-tuning when the teacher is made here (--teacher unset)")
    teacher_lr: float = _opt(TEACHER_LR, "learning rate of that fine-tuning")
    # --- data ---
    task: str = _opt("rotten_tomatoes", "built-in task; ignored when --train-file is given", choices=TASKS)
    train_file: str | None = _opt(None, "training rows: a .csv, .tsv or .jsonl file, optionally .gz/.bz2 "
                                  "(replaces --task)")
    eval_file: str | None = _opt(None, "test rows, same format and columns as --train-file (validation is then "
                                 "carved from --train-file); without it part of --train-file is held out for both")
    text_column: str = _opt("text", "column holding the text (files only)")
    text_pair_column: str | None = _opt(None, "column holding the second text of a pair task (files only)")
    label_column: str = _opt("label", "column holding the label, integer or string (files only)")
    max_train_examples: int | None = _opt(1000, "keep a random subset of this many training examples, fixed "
                                          "seed (0 or unset: all)")
    max_eval_examples: int | None = _opt(600, "keep a random subset of this many validation and test examples "
                                         "each (0 or unset: all)")
    max_length: int = _opt(48, "tokens per example, padding and truncating")
    # --- method ---
    mode: str = _opt("sage", "sage: synthesise where the loss is high; kd: plain distillation, no synthesis; "
                     "random: same number of synthetic examples, anchors drawn uniformly; inverse: sage's anchors, partners "
                     "found through the map's approximate inverse (jittered anchors mapped back)", choices=MODES)
    compare: list[str] = _opt(["kd"], "baseline modes to run after the main one with the same settings "
                              "(comma-separated, e.g. 'kd,random'; 'none' for no baseline)")
    alpha: float = _opt(0.5, "weight of the soft-label KL term; 1 - alpha weighs cross-entropy on real labels")
    temperature: float = _opt(2.0, "softmax temperature of the KL term")
    beta: float = _opt(0.0, "weight of the hidden-state alignment term (0 turns it off and caches only logits)")
    # --- optimisation ---
    epochs: int = _opt(3, "passes over the training data")
    max_steps: int | None = _opt(None, "stop after this many optimiser steps in total (unset: epochs decide)")
    batch_size: int = _opt(32, "the global batch: real examples per optimizer step over all processes and "
                                "micro-batches (under torchrun each process trains on its share, so the same command "
                                "gives the same run)")
    grad_accumulation: int = _opt(1, "micro-batches each process splits its share of a step into (gradient "
                                     "accumulation): the same step in less memory")
    eval_batch_size: int = _opt(128, "examples per forward pass in evaluation and teacher labelling")
    lr: float = _opt(1e-4, "peak learning rate (AdamW, linear warm-up then linear decay)")
    weight_decay: float = _opt(0.01, "AdamW weight decay")
    warmup_ratio: float = _opt(0.06, "share of the steps spent warming up the learning rate")
    # --- synthesis ---
    analysis_every: int | None = _opt(None, "steps between analysis rounds (unset: a third of an epoch, three "
                                      "rounds an epoch; none after the last step)")
    analysis_lag: int | None = _opt(None, "steps a round's analysis and synthesis run beside training before its "
                                    "examples join the pool (0: training waits for each round, inline; unset: every "
                                    "step between rounds but the last)")
    synthetic_per_round: int = _opt(256, "synthetic examples made in each analysis round")
    synthetic_per_batch: int = _opt(16, "synthetic examples mixed into each step once the pool has some")
    pool_size: int = _opt(1024, "most synthetic examples kept; older ones leave first (fifo) or at random "
                          "(reservoir)")
    pool_policy: str = _opt("fifo", "how the full pool makes room", choices=POOL_POLICIES)
    quantile: float = _opt(0.7, "anchors come from examples whose region score is above this quantile")
    n_neighbors: int = _opt(10, "neighbours in the kNN graph and the UMAP map")
    lam_low: float = _opt(0.3, "lower bound of the interpolation weight lam")
    lam_high: float = _opt(0.7, "upper bound of the interpolation weight lam")
    noise_std: float = _opt(0.0, "Gaussian noise added to synthetic vectors")
    partners: str = _opt("neighbours", "each anchor's partner: any of its map neighbours ('neighbours'), one the "
                         "teacher puts in another class ('boundary', mixing across the decision boundary), or one "
                         "with the anchor's gold label ('same-label': the synthetic row then carries that label, so "
                         "the cross-entropy term holds it to the gold label where the teacher's may be wrong)",
                         choices=PARTNERS)
    profile_signal: str = _opt("loss", "what marks a training row as hard: its SAGE loss ('loss'), only the "
                               "student's disagreement with the teacher, T^2 KL ('disagreement'), or its loss where "
                               "the teacher agrees with the gold label and 0 where it does not ('trusted': synthetic "
                               "rows carry the teacher's labels, which can only help where they are right)",
                               choices=PROFILE_SIGNALS)
    refresh_profile: bool = _opt(False, "before each round, recompute every training row's profile in one no-grad "
                                 "pass (current, at the cost of a forward pass over the data)")
    profile_decay: float | None = _opt(None, "unset: each row's profile is the mean over all its visits; in (0, 1]: "
                                       "old visits fade, each moving it by max(decay, 1/visits)")
    generator: str = _opt("interpolate", "how a round makes synthetic rows from its anchors, under every mode (so each "
                          "generator has its random-anchor control): 'interpolate' mixes each anchor with its partner "
                          "(--lam-low, --lam-high, --noise-std); 'substitute' replaces a share of the anchor's word "
                          "pieces by their nearest tokens in the teacher's embedding table (real text; a few rows of "
                          "each round are shown in the log); 'boundary' takes bounded steps from the anchor toward "
                          "more student-teacher disagreement (one student backward a step)", choices=GENERATORS)
    substitute_share: float = _opt(0.15, "generator substitute: share of an anchor's word pieces replaced, in [0, 1]")
    substitute_top_k: int = _opt(8, "generator substitute: a replaced word piece becomes one of its this many nearest "
                                 "tokens (cosine similarity in the teacher's embedding table)")
    substitute_span: float = _opt(0.0, "generator substitute: share of the partner's word pieces taken as one span in "
                                  "place of as many of the anchor's, in [0, 1] (0: none)")
    boundary_steps: int = _opt(3, "generator boundary: steps from each anchor")
    boundary_step_size: float = _opt(0.05, "generator boundary: the most a token moves in one step, as a share of "
                                     "the anchor's mean token-vector norm (above 0)")
    synthetic_volume: float | None = _opt(None, "synthetic rows made per epoch as a multiple of the training rows "
                                          "(e.g. 4), spread over the epoch's rounds: sets synthetic-per-round, and "
                                          "pool-size to at least one round (unset: synthetic-per-round decides)")
    synthetic_share: float | None = _opt(None, "share of each step's rows that are synthetic once the pool has some, "
                                         "in [0, 1) (e.g. 0.5: as many synthetic rows as real ones): sets "
                                         "synthetic-per-batch (unset: synthetic-per-batch decides)")
    label_batch_size: int | None = _opt(None, "rows per teacher forward when the teacher labels a round's synthetic "
                                        "rows (unset: eval-batch-size): large rounds label faster in large batches")
    # --- run ---
    device: str = _opt("auto", DEVICE_HELP)
    seed: int = _opt(0, "seed for data order, initialisation, analysis and synthesis")
    output_dir: str | None = _opt(None, "where results, checkpoints and plots go (unset: runs/<timestamp>)")
    cache_dir: str | None = _opt(None, "where teacher outputs are cached (unset: $SAGE_FAST_CACHE/teacher_outputs, "
                                 "else ~/.cache/sage_fast/teacher_outputs)")
    progress: bool = _opt(True, "show progress bars")
    log_every: int = _opt(10, "steps between training-loss lines in metrics.jsonl")
    dist_timeout: float = _opt(300.0, "under torchrun: seconds a process waits for the others before it stops with "
                                      "a message (a process that died ends the run within this time)")

    # ---------------------------------------------------------------- checks
    def validate(self) -> "DistillConfig":
        bad, positive_int, number = _bad, self._positive_int, self._number
        self._check_types()
        for name, options in (("mode", MODES), ("task", TASKS), ("pool_policy", POOL_POLICIES),
                              ("partners", PARTNERS), ("profile_signal", PROFILE_SIGNALS), ("generator", GENERATORS)):
            if getattr(self, name) not in options:
                raise bad(name, f"one of {', '.join(options)}", getattr(self, name))
        try:
            check_device(self.device)
        except DeviceError as err:
            raise ConfigError(str(err)) from None
        self.compare = parse_compare(self.compare)
        if self.mode in self.compare:
            self.compare = [m for m in self.compare if m != self.mode]
        for name in ("batch_size", "grad_accumulation", "eval_batch_size", "synthetic_per_round", "pool_size",
                     "n_neighbors", "epochs", "log_every"):
            positive_int(name)
        for name in ("max_steps", "analysis_every", "label_batch_size"):
            positive_int(name, allow_none=True)
        positive_int("substitute_top_k")
        positive_int("boundary_steps")
        for name in ("max_train_examples", "max_eval_examples", "analysis_lag"):
            positive_int(name, allow_none=True, allow_zero=True)
        positive_int("synthetic_per_batch", allow_zero=True)
        positive_int("seed", allow_zero=True)
        positive_int("max_length", minimum=2)  # room for the special tokens
        number("alpha", 0.0, 1.0)
        number("temperature", 0.0, math.inf, lo_open=True, hi_open=True)
        number("beta", 0.0, math.inf, hi_open=True)
        number("lr", 0.0, math.inf, lo_open=True, hi_open=True)
        number("teacher_lr", 0.0, math.inf, lo_open=True, hi_open=True)
        number("teacher_epochs", 0.0, math.inf, lo_open=True, hi_open=True)
        number("weight_decay", 0.0, math.inf, hi_open=True)
        number("warmup_ratio", 0.0, 1.0, hi_open=True)
        number("quantile", 0.0, 1.0, lo_open=True, hi_open=True)
        number("lam_low", 0.0, 1.0)
        number("lam_high", 0.0, 1.0)
        number("noise_std", 0.0, math.inf, hi_open=True)
        number("dist_timeout", 0.0, math.inf, lo_open=True, hi_open=True)
        number("substitute_share", 0.0, 1.0)
        number("substitute_span", 0.0, 1.0)
        number("boundary_step_size", 0.0, math.inf, lo_open=True, hi_open=True)
        if self.synthetic_volume is not None:
            number("synthetic_volume", 0.0, math.inf, lo_open=True, hi_open=True)
        if self.synthetic_share is not None:
            number("synthetic_share", 0.0, 1.0, hi_open=True)
            from ..synthesis.volume import synthetic_rows_per_step

            self.synthetic_per_batch = synthetic_rows_per_step(self.batch_size, self.synthetic_share)
        if self.profile_decay is not None:
            number("profile_decay", 0.0, 1.0, lo_open=True)
        self._check_combinations()
        if not isinstance(self.student, str) or not self.student:
            raise bad("student", "a model folder, hub id, config file or 'from-teacher:K'", self.student)
        if self.student.startswith("from-teacher"):
            _, _, k = self.student.partition(":")
            if not (k.isdigit() and int(k) >= 1):
                raise bad("student", "'from-teacher:K' with K a positive integer (every K-th teacher layer)",
                          self.student)
        for name in ("text_column", "label_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise bad(name, "a column name", getattr(self, name))
        self._check_synthesis()
        self._check_paths()
        return self

    def _check_paths(self) -> None:
        """The folders a run writes must be usable; paths are saved absolute (``absolute_paths``)."""
        check_folder("output-dir", self.output_dir or "runs")
        for name, value in absolute_paths(self.to_dict()).items():
            setattr(self, name, value)
        if self.cache_dir:
            check_folder("cache-dir", self.cache_dir)

    def _check_synthesis(self) -> None:
        """The synthesizer's own check of its settings, for each mode that makes one, here with the
        rest: a setting only it refuses (``n_neighbors`` 1) would otherwise stop the run after the
        data, the teacher and, with a synthesis mode compared, a whole baseline."""
        names = {item.name for item in dataclasses.fields(self)}
        for mode in dict.fromkeys([self.mode, *self.compare]):
            if mode == "kd":
                continue
            try:
                self.synthesis_settings(mode, "cpu")
            except ValueError as err:  # said with the flags' names
                raise ConfigError(re.sub(r"\b[a-z]+(?:_[a-z]+)+\b",
                                         lambda m: m.group(0).replace("_", "-") if m.group(0) in names else m.group(0),
                                         str(err))) from None

    def synthesis_settings(self, mode: str, device, *, num_examples: int | None = None,
                           steps_per_epoch: int | None = None, interval: int | None = None):
        """The synthesizer's settings (a ``SynthesisConfig``) for ``mode`` (``sage``, ``random`` or
        ``inverse``), on ``device``; with ``synthetic_volume``, each round's rows follow from the run's
        rows and schedule (without them, as for the loss map of a finished run, the flag's round size)."""
        from ..synthesis import SynthesisConfig
        from ..synthesis.volume import rows_per_round

        per_round, pool_size = self.synthetic_per_round, self.pool_size
        if self.synthetic_volume is not None:
            if None not in (num_examples, steps_per_epoch, interval):
                per_round = rows_per_round(self.synthetic_volume, num_examples, steps_per_epoch, interval)
            pool_size = max(pool_size, per_round)
        return SynthesisConfig(
            mode=mode, synthetic_per_round=per_round, pool_size=pool_size,
            pool_policy=self.pool_policy, quantile=self.quantile, n_neighbors=self.n_neighbors,
            lam_low=self.lam_low, lam_high=self.lam_high, noise_std=self.noise_std, seed=self.seed,
            device=device, profile_decay=self.profile_decay, partners=self.partners, generator=self.generator,
            substitute_share=self.substitute_share, substitute_top_k=self.substitute_top_k,
            substitute_span=self.substitute_span, boundary_steps=self.boundary_steps,
            boundary_step_size=self.boundary_step_size)

    def _positive_int(self, name: str, allow_none: bool = False, allow_zero: bool = False, minimum: int = 1):
        # Imported here, not at the top: _checks imports torch, and the command line builds its
        # parser from this module, so --help would pay for torch.
        from .._checks import integer

        value = getattr(self, name)
        if value is None and allow_none:
            return
        try:
            integer(name.replace("_", "-"), value, minimum=0 if allow_zero else minimum)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def _number(self, name: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
        value = _number_from_text(getattr(self, name))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _bad(name, "a finite number", value)
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
        if not ok:
            interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
            raise _bad(name, f"in {interval}", value)
        setattr(self, name, float(value))

    def _check_combinations(self) -> None:
        """Settings that are fine alone but cannot work together."""
        if self.batch_size % self.grad_accumulation:
            raise ConfigError(f"batch-size ({self.batch_size}) must be a multiple of grad-accumulation "
                              f"({self.grad_accumulation}): each micro-batch takes an equal share of the step")
        if self.partners != "neighbours" and "inverse" in [self.mode, *self.compare]:
            raise ConfigError(f"partners {self.partners!r} picks among map neighbours, while mode 'inverse' finds partners "
                              "through the map's inverse: leave inverse out of --mode/--compare, or use "
                              "--partners neighbours")
        if self.generator == "boundary" and self.partners != "neighbours":
            raise ConfigError(f"partners {self.partners!r} chooses partners, and generator 'boundary' steps from the "
                              "anchor alone: use --partners neighbours with it")
        if self.lam_low > self.lam_high:
            raise ConfigError(f"lam-low ({self.lam_low}) must not exceed lam-high ({self.lam_high})")
        if self.pool_size < self.synthetic_per_round and self.synthetic_volume is None:
            raise ConfigError(
                f"pool-size ({self.pool_size}) must be at least synthetic-per-round ({self.synthetic_per_round}): "
                "otherwise each round would push out examples it has just made")
        if self.eval_file is not None and self.train_file is None:
            raise ConfigError("eval-file was given without train-file; give both, or neither to use --task")

    def _check_types(self) -> None:
        """Text settings must be text and switches true or false: a config file can hold anything,
        and ``train_file: 5`` would otherwise fail deep inside the run. Numbers are checked with
        their ranges in ``validate``."""
        hints = typing.get_type_hints(type(self))
        for item in dataclasses.fields(self):
            value, hint = getattr(self, item.name), hints[item.name]
            optional = type(None) in typing.get_args(hint)
            if value is None and optional:
                continue
            if hint in (str, str | None) and not isinstance(value, str):
                kind = "text or unset" if optional else "text"
                raise ConfigError(f"{item.name.replace('_', '-')} must be {kind}, got {value!r} "
                                  f"({type(value).__name__})")
            if hint is bool and not isinstance(value, bool):
                raise ConfigError(f"{item.name.replace('_', '-')} must be true or false, got {value!r}")

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "DistillConfig":
        return cls().updated(values, source=source)

    def updated(self, values: dict[str, Any], *, source: str = "config") -> "DistillConfig":
        """A copy with ``values`` applied; unknown keys are an error naming where they came from."""
        known = {f.name for f in dataclasses.fields(self)}
        values = canonical(values)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source} has unknown setting(s) {', '.join(unknown)}; "
                              f"known settings: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **values)

    def save(self, directory: str | Path) -> None:
        import yaml

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        (directory / "config.json").write_text(json.dumps(data, indent=2) + "\n")
        (directory / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def _number_from_text(value):
    """YAML 1.1 reads ``1e-3`` (no dot) as text; a number written as text is still that number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def check_folder(flag: str, path) -> Path:
    """``path`` as a Path, or a ConfigError when it (or a folder it would be made in) is a file."""
    path = Path(path)
    for place in (path, *path.parents):
        if place.exists():
            if not place.is_dir():
                where = "" if place == path else f" (within {flag} {path})"
                raise ConfigError(f"{flag} {place} is a file, not a folder{where}; give a folder, or a path where "
                                  "one can be made")
            break
    return path


# Settings that name files or folders: saved as absolute paths, so that a run is continued, analysed
# or exported from any directory (a relative path would be read against wherever that happens).
PATH_SETTINGS = ("train_file", "eval_file", "cache_dir", "teacher", "student")


def absolute_paths(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with relative paths made absolute: data files and the cache folder always, a
    teacher or student only when it names a local folder or file (not a hub id or ``minilm``)."""
    out = dict(values)
    for name in PATH_SETTINGS:
        value = out.get(name)
        if not isinstance(value, str) or not value or value.startswith("from-teacher"):
            continue
        path = Path(value).expanduser()
        if name in ("teacher", "student") and not path.exists():
            continue
        out[name] = str(path.absolute())
    return out


def canonical(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with keys as setting names: ``-`` read as ``_``, TrainingArguments names as ours."""
    out = {}
    for key, value in values.items():
        key = str(key).replace("-", "_")
        out[TRAINING_ARGUMENTS_NAMES.get(key, key)] = value
    return out


def parse_compare(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"compare must be a comma-separated text or a list of modes among {', '.join(MODES)} "
                          f"(or 'none'), got {value!r}")
    out: list[str] = []
    for mode in value:
        if mode == "none":
            continue
        if mode not in MODES:
            raise ConfigError(f"compare must list modes among {', '.join(MODES)} (or 'none'), got {mode!r}")
        if mode not in out:
            out.append(mode)
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML or JSON file (JSON is YAML, so one parser reads both)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read the config file {path}: {err.strerror or err}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"the config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                          f"{str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"the config file {path} must hold a mapping of setting: value, got {type(data).__name__}")
    return data


def resolve(flags: dict[str, Any], config_file: str | Path | None = None) -> DistillConfig:
    """Defaults, then the file, then the flags the user actually gave; validated."""
    config = DistillConfig()
    if config_file is not None:
        config = config.updated(read_config_file(config_file), source=f"the config file {config_file}")
    config = config.updated(flags, source="the command line")
    return config.validate()
