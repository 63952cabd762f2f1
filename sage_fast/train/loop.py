"""The SAGE training loop (see DESIGN.md, "The SAGE loop").

Per step: a batch of real examples, whose teacher outputs come from the on-disk cache, mixed with
synthetic examples drawn from the bounded pool; ``SAGELoss`` on both; the real rows' per-example
losses and pooled student embeddings fold into the ``ErrorProfile``. Every ``analysis_every`` steps
(or at the end of each epoch but the last) an analysis round fits ``LossRegionAnalyzer`` on the
examples seen so far, draws anchor/partner pairs (from high-loss regions in mode ``sage``, uniformly
in mode ``random``), interpolates their teacher-embedded vectors, lets the teacher label the results
through the same vector interface, and hands them to the pool. Mode ``kd`` never synthesises.

Evaluation is on real text only: validation accuracy each epoch, test accuracy at the end. Each
epoch ends with an atomic checkpoint; Ctrl-C stops at the end of the current step, writes a
checkpoint and says how to resume. On CPU with a fixed seed, a resumed run gives the same final
metrics as an uninterrupted one: data order depends only on (seed, epoch), and every random stream
(torch's global one for dropout, the pool's and the analysis' generators) is checkpointed.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import DataError, ModelError
from . import checkpoint as ckpt
from . import teacher_cache
from .config import DistillConfig
from .metrics import MetricsLog, Timer, format_table
from .pool import SyntheticPool

DEFAULT_TEACHER_BASE = "minilm"
MIN_ANALYSIS_EXAMPLES = 8
RESULTS_FILE = "results.json"


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: a checkpoint was written; the message says how to resume."""


def default_cache_dir() -> Path:
    from ..assets import cache_root

    return cache_root() / "teacher_outputs"


# ------------------------------------------------------------------------------------------ setup
@dataclass
class Setup:
    """What every mode of one invocation shares: data, teacher, tokenizer, cached teacher outputs."""
    config: DistillConfig
    device: torch.device
    data: object
    tokenizer: object
    teacher: torch.nn.Module
    teacher_name: str
    encoded: dict
    teacher_outputs: dict
    teacher_layers: list[int]
    student_init: torch.nn.Module
    layer_map: dict[int, int]
    teacher_metrics: dict = field(default_factory=dict)


def _check_teacher_labels(teacher, num_labels: int, name: str) -> None:
    if int(teacher.config.num_labels) != num_labels:
        raise ModelError(f"the teacher {name} has {teacher.config.num_labels} labels but the task has {num_labels}; "
                         "use a teacher fine-tuned on this task, or leave --teacher unset to fine-tune one")


def _teacher_label_count(name_or_path: str) -> int | None:
    """The label count a saved classifier was trained with, or None when it has no task head."""
    from .models import resolve_model_path

    path = Path(resolve_model_path(name_or_path))
    config_file = path / "config.json" if path.is_dir() else None
    if config_file is None or not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    if not any("ForSequenceClassification" in a for a in config.get("architectures") or []):
        return None
    if "id2label" in config:
        return len(config["id2label"])
    # Recent transformers leave the label count out of config.json when it is the default (2).
    return int(config.get("num_labels", 2))


def build_setup(config: DistillConfig, log=print) -> Setup:
    from .data import encode, load_task
    from .models import VectorInterface, load_classifier, load_tokenizer
    from .teacher import fine_tune_teacher, read_teacher_metrics, resolve_device

    device = resolve_device(config.device)
    task = config.task if config.train_file is None else Path(config.train_file).name.split(".")[0]
    data = load_task(task, train_file=config.train_file, eval_file=config.eval_file,
                     text_column=config.text_column, text_pair_column=config.text_pair_column,
                     label_column=config.label_column, max_train_examples=config.max_train_examples or None,
                     max_eval_examples=config.max_eval_examples or None, seed=config.seed)
    if data.num_labels < 2:
        raise DataError(f"the training data has a single label ({data.label_names}); a classifier needs at least two")
    log(f"data: {data.summary()}")
    teacher_metrics = {}
    if config.teacher is None:
        from .teacher import TeacherSettings

        folder = fine_tune_teacher(DEFAULT_TEACHER_BASE, data, device=device, progress=config.progress, log=log,
                                   settings=TeacherSettings(epochs=config.teacher_epochs, lr=config.teacher_lr,
                                                            max_length=config.max_length, seed=config.seed))
        teacher_name = str(folder)
        teacher_metrics = read_teacher_metrics(folder)
    else:
        teacher_name = config.teacher
        saved_labels = _teacher_label_count(teacher_name)
        if saved_labels is not None and saved_labels != data.num_labels:
            raise ModelError(f"the teacher {teacher_name} was trained with {saved_labels} labels but the task has "
                             f"{data.num_labels} ({data.label_names}); use a teacher fine-tuned on this task")
        if saved_labels is None:
            log(f"warning: {teacher_name} has no trained classification head; its soft labels carry little "
                "information (fine-tune it first: sage-fast teacher)")
    teacher = load_classifier(teacher_name, data.num_labels).to(device).eval().requires_grad_(False)
    _check_teacher_labels(teacher, data.num_labels, teacher_name)
    tokenizer = load_tokenizer(teacher_name)
    encoded = {name: encode(split, tokenizer, config.max_length) for name, split in data.splits().items()}

    torch.manual_seed(config.seed)
    student = build_student(config.student, teacher, data.num_labels).to(device)
    from ..nn import SAGELossConfig

    layer_map = SAGELossConfig(num_student_layers=student.config.num_hidden_layers,
                               num_teacher_layers=teacher.config.num_hidden_layers).resolved_layer_map()
    teacher_layers = sorted(set(layer_map.values())) if config.beta > 0 else []
    # Only the teacher side of this interface is used: the teacher stands in as its own student.
    labeller = VectorInterface(teacher, teacher)

    def forward(batch):
        out = labeller.teacher_forward(labeller.embed(batch["input_ids"]), batch["attention_mask"],
                                       bool(teacher_layers), batch.get("token_type_ids"))
        return out.logits, out.hidden_states

    identity = teacher_cache.model_identity(teacher)
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    outputs = {}
    for name in ("train", "validation", "test"):
        layers = teacher_layers if name == "train" else []
        key = teacher_cache.cache_key(identity, data.fingerprint(), name, config.max_length, layers)
        outputs[name], hit = teacher_cache.load_or_compute(
            cache_dir, key, lambda: teacher_cache.compute(forward, encoded[name], layers, config.eval_batch_size,
                                                          device, config.progress, f"teacher outputs ({name})"))
        if hit:
            log(f"teacher outputs for {name} from the cache ({cache_dir})")
    for name in ("validation", "test"):
        predicted = outputs[name]["logits"].argmax(-1)
        teacher_metrics[f"{name}_accuracy_vector"] = float((predicted == encoded[name]["labels"]).float().mean())
    return Setup(config, device, data, tokenizer, teacher, teacher_name, encoded, outputs, teacher_layers,
                 student, layer_map, teacher_metrics)



def build_student(spec: str, teacher, num_labels: int):
    """``from-teacher:K``, a config file (``.json``), or a model folder / hub id."""
    from .models import load_classifier, student_from_config, student_from_teacher

    if spec.startswith("from-teacher"):
        _, _, k = spec.partition(":")
        try:
            every_k = int(k or 2)
        except ValueError:
            raise ModelError(f"--student from-teacher:K needs an integer K (every K-th teacher layer), got {spec!r}") from None
        return student_from_teacher(teacher, every_k=every_k)
    if spec.endswith(".json"):
        if not Path(spec).is_file():
            raise ModelError(f"no student config file at {spec}")
        return student_from_config(str(Path(spec).parent) if Path(spec).name == "config.json" else spec, num_labels)
    saved_labels = _teacher_label_count(spec)
    if saved_labels is not None and saved_labels != num_labels:
        raise ModelError(f"the student {spec} was trained with {saved_labels} labels but the teacher and task have "
                         f"{num_labels}; teacher and student must predict the same label set")
    return load_classifier(spec, num_labels)


def build_loss(config: DistillConfig, setup: Setup, student):
    from ..nn import SAGELoss, SAGELossConfig

    teacher = setup.teacher
    return SAGELoss(SAGELossConfig(
        alpha=config.alpha, temperature=config.temperature, beta=config.beta,
        layer_map=setup.layer_map if config.beta > 0 else None,
        num_student_layers=student.config.num_hidden_layers, num_teacher_layers=teacher.config.num_hidden_layers,
        student_hidden_size=student.config.hidden_size, teacher_hidden_size=teacher.config.hidden_size,
    ))


def _linear_schedule(optimizer, total_steps: int, warmup_ratio: float):
    warmup = int(warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (step + 1) / (warmup + 1) if step < warmup
        else max(0.0, (total_steps - step) / max(1, total_steps - warmup)))


class _StopRequest:
    """First Ctrl-C: finish the current step, checkpoint, stop. A second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C cannot reach us anyway
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def after_step(run: "ModeRun") -> None:
    """Called after every optimiser step; a seam for tests that simulate interruptions."""


class ModeRun:
    """One mode (sage, kd or random) trained from ``setup``, in ``out_dir``."""

    def __init__(self, setup: Setup, mode: str, out_dir: Path, log=print, read_only: bool = False):
        import copy

        from ..regions import ErrorProfile
        from .models import VectorInterface

        self.setup, self.config, self.mode, self.out_dir, self.log = setup, setup.config, mode, Path(out_dir), log
        config, device = self.config, setup.device
        ckpt.seed_everything(config.seed)
        student = copy.deepcopy(setup.student_init)
        self.interface = VectorInterface(setup.teacher, student).to(device)
        self.loss_fn = build_loss(config, setup, student).to(device)
        params = self.interface.trainable_parameters() + [p for p in self.loss_fn.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.n_train = setup.encoded["train"]["input_ids"].shape[0]
        self.steps_per_epoch = math.ceil(self.n_train / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.scheduler = _linear_schedule(self.optimizer, self.total_steps, config.warmup_ratio)
        self.profile = ErrorProfile(self.n_train, student.config.hidden_size, device)
        self.pool = SyntheticPool(config.pool_size, config.pool_policy)
        self.pool_generator = torch.Generator().manual_seed(config.seed + 1)
        self.analysis_generator = torch.Generator(device=device).manual_seed(config.seed + 2)
        self.epoch = 0            # completed epochs
        self.step_in_epoch = 0    # completed steps of the current epoch
        self.global_step = 0
        self.analysis_round = 0
        self.examples_seen = {"real": 0, "synthetic": 0}
        self.timer = Timer()
        self.done = False
        self.read_only = read_only
        self.metrics = MetricsLog(None if read_only else self.out_dir / "metrics.jsonl")
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                         else contextlib.nullcontext())

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / ckpt.CHECKPOINT_NAME

    def state_dict(self) -> dict:
        return {
            "format": ckpt.FORMAT_VERSION, "mode": self.mode, "config": self.config.to_dict(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "analysis_round": self.analysis_round, "examples_seen": dict(self.examples_seen), "done": self.done,
            "student": self.interface.student.state_dict(), "adapter": self.interface.adapter.state_dict(),
            "loss": self.loss_fn.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": ckpt.rng_state(),
            "pool_generator": self.pool_generator.get_state(),
            "analysis_generator": self.analysis_generator.get_state(),
            "profile": self.profile.state_dict(), "pool": self.pool.state_dict(),
            "metrics": self.metrics.records, "timer": dict(self.timer.seconds),
            "total_steps": self.total_steps,
        }

    def save(self) -> Path:
        return ckpt.save_atomic(self.state_dict(), self.checkpoint_path)

    def load(self, state: dict) -> None:
        if state["mode"] != self.mode:
            raise ckpt.CheckpointError(f"{self.checkpoint_path} holds a {state['mode']!r} run, not {self.mode!r}")
        device = self.setup.device
        self.interface.student.load_state_dict(state["student"])
        self.interface.adapter.load_state_dict(state["adapter"])
        self.loss_fn.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        saved_total = state["total_steps"]
        self.scheduler.load_state_dict(state["scheduler"])
        if saved_total != self.total_steps:  # more epochs or steps asked for: stretch the schedule
            self.scheduler = _linear_schedule(self.optimizer, self.total_steps, self.config.warmup_ratio)
            self.scheduler.last_epoch = state["global_step"] - 1
            self.scheduler.step()
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.analysis_round = state["global_step"], state["analysis_round"]
        self.examples_seen = dict(state["examples_seen"])
        self.done = state["done"] and self.global_step >= self.total_steps
        self.profile.load_state_dict({k: v.to(device) if torch.is_tensor(v) else v
                                      for k, v in state["profile"].items()})
        self.pool.load_state_dict(state["pool"], device=device)
        self.pool_generator.set_state(state["pool_generator"])
        self.analysis_generator.set_state(state["analysis_generator"])
        ckpt.set_rng_state(state["rng"])
        self.timer = Timer(state["timer"])
        self.metrics = MetricsLog(None if self.read_only else self.out_dir / "metrics.jsonl", state["metrics"])

    # ------------------------------------------------------------------ one step
    def _real_batch(self, rows: torch.Tensor):
        device = self.setup.device
        enc = self.setup.encoded["train"]
        cached = self.setup.teacher_outputs["train"]
        batch = {
            "input_ids": enc["input_ids"][rows].to(device), "mask": enc["attention_mask"][rows].to(device),
            "labels": enc["labels"][rows].to(device), "ids": enc["ids"][rows].to(device),
            "logits": cached["logits"][rows].to(device),
            "hidden": {k: v[rows].to(device) for k, v in cached["hidden"].items()},
        }
        if "token_type_ids" in enc:
            batch["token_type_ids"] = enc["token_type_ids"][rows].to(device)
        return batch

    def train_step(self, rows: torch.Tensor) -> float:
        from ..regions import pooled_embedding

        config = self.config
        real = self._real_batch(rows)
        vectors = self.interface.embed(real["input_ids"])
        mask, logits, hidden = real["mask"], real["logits"], dict(real["hidden"])
        labels = real["labels"]
        token_types = real.get("token_type_ids")
        n_real = vectors.shape[0]
        synthetic = self.pool.sample(config.synthetic_per_batch, self.pool_generator) if self.mode != "kd" else None
        if synthetic is not None:
            s_vectors, s_mask, s_logits, s_hidden = synthetic
            vectors = torch.cat([vectors, s_vectors.to(vectors.dtype)])
            mask = torch.cat([mask, s_mask.to(mask.dtype)])
            logits = torch.cat([logits, s_logits])
            hidden = {k: torch.cat([v, s_hidden[k].to(v.dtype)]) for k, v in hidden.items()}
            labels = torch.cat([labels, labels.new_full((s_vectors.shape[0],), self.loss_fn.config.ignore_index)])
            if token_types is not None:  # synthetic rows were labelled with token type 0 throughout
                token_types = torch.cat([token_types, token_types.new_zeros(s_mask.shape)])
        width = int(mask.sum(1).max())  # trim padding shared by every row of this batch
        vectors, mask = vectors[:, :width], mask[:, :width]
        hidden = {k: v[:, :width].float() for k, v in hidden.items()}
        if token_types is not None:
            token_types = token_types[:, :width]
        teacher_outputs = {"logits": logits, "hidden_states": hidden or None}

        self.interface.train()
        with self.autocast:
            student_out = self.interface.student_forward(vectors, mask, output_hidden_states=True,
                                                         token_type_ids=token_types)
            result = self.loss_fn(student_out, teacher_outputs, labels=labels, attention_mask=mask)
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            embeddings = pooled_embedding(student_out.hidden_states[-1][:n_real].detach(), mask[:n_real])
            self.profile.update(real["ids"], result.per_example[:n_real].detach().float(), embeddings)
        self.examples_seen["real"] += n_real
        self.examples_seen["synthetic"] += vectors.shape[0] - n_real
        return float(result.loss.detach())

    # ------------------------------------------------------------------ analysis and synthesis
    def analysis_round_now(self) -> None:
        from ..ops import interpolate

        config, device = self.config, self.setup.device
        if int(self.profile.seen.sum()) < MIN_ANALYSIS_EXAMPLES:
            return
        self.analysis_round += 1
        with self.timer.measure("analysis"):
            analyzer, seen = self.fit_analyzer(config.seed * 1000 + self.analysis_round)
            sample = analyzer.sample_pairs if self.mode == "sage" else analyzer.sample_uniform_pairs
            anchors, partners, lam = sample(config.synthetic_per_round, self.analysis_generator)
        with self.timer.measure("synthesis"):
            anchor_ids, partner_ids = seen[anchors], seen[partners]
            rows, inverse = torch.unique(torch.cat([anchor_ids, partner_ids]), return_inverse=True)
            enc = self.setup.encoded["train"]
            cpu_rows = rows.cpu()
            vectors = self.interface.embed(enc["input_ids"][cpu_rows].to(device))
            mask = enc["attention_mask"][cpu_rows].to(device)
            m = anchor_ids.shape[0]
            out, out_mask = interpolate(vectors, mask, inverse[:m], inverse[m:], lam.float(),
                                        noise_std=config.noise_std, seed=config.seed * 1000 + self.analysis_round)
            logits, hidden = self._label(out, out_mask)
            self.pool.add(out, out_mask, logits, hidden, generator=self.pool_generator)
        png = None
        with self.timer.measure("plot"):
            try:
                from ..plot import loss_map

                png = str(loss_map(analyzer, self.out_dir / f"loss_map_round{self.analysis_round:03d}.png",
                                   synthetic=(anchors, partners, lam), anchors=anchors,
                                   title=f"{self.mode}: round {self.analysis_round}, step {self.global_step}, "
                                         f"{int(seen.numel())} examples, {int(m)} synthetic"))
            except ImportError as err:  # matplotlib is optional: the run goes on without the picture
                self.log(f"no loss map: {err}")
        self.metrics.log(kind="analysis", mode=self.mode, round=self.analysis_round, step=self.global_step,
                         epoch=self.epoch, examples=int(seen.numel()), synthetic=int(m), pool=len(self.pool),
                         threshold=float(analyzer.threshold_), png=png)

    @torch.no_grad()
    def _label(self, vectors, mask):
        logits, hidden = [], {k: [] for k in self.setup.teacher_layers}
        step = self.config.eval_batch_size
        for start in range(0, vectors.shape[0], step):
            with self.autocast:
                out = self.interface.teacher_forward(vectors[start:start + step], mask[start:start + step],
                                                     output_hidden_states=bool(hidden))
            logits.append(out.logits.float())
            for k in hidden:
                hidden[k].append(out.hidden_states[k].to(torch.float16))
        return torch.cat(logits), {k: torch.cat(v) for k, v in hidden.items()}

    @torch.no_grad()
    def refresh_profile(self) -> None:
        """Recompute every training example's loss and pooled embedding in one no-grad pass."""
        from ..regions import pooled_embedding

        n, step = self.n_train, self.config.eval_batch_size
        self.interface.eval()

        def batches():
            for start in range(0, n, step):
                real = self._real_batch(torch.arange(start, min(n, start + step)))
                width = int(real["mask"].sum(1).max())
                mask = real["mask"][:, :width]
                types = real.get("token_type_ids")
                with self.autocast:
                    out = self.interface.student_forward(self.interface.embed(real["input_ids"][:, :width]), mask,
                                                         output_hidden_states=True,
                                                         token_type_ids=None if types is None else types[:, :width])
                    teacher = {"logits": real["logits"],
                               "hidden_states": {k: v[:, :width].float() for k, v in real["hidden"].items()} or None}
                    result = self.loss_fn(out, teacher, labels=real["labels"], attention_mask=mask)
                yield real["ids"], result.per_example.float(), pooled_embedding(out.hidden_states[-1], mask)

        self.profile.refresh(batches())
        self.interface.train()

    def fit_analyzer(self, round_seed: int):
        from ..regions.analyzer import LossRegionAnalyzer

        seen = self.profile.seen.nonzero().squeeze(1)
        analyzer = LossRegionAnalyzer(
            # UMAP needs n_neighbors + 2 points at least: a large setting is capped to the data.
            n_neighbors=max(2, min(self.config.n_neighbors, seen.numel() - 2)), quantile=self.config.quantile,
            lam_range=(self.config.lam_low, self.config.lam_high), random_state=round_seed,
            device=self.setup.device)
        return analyzer.fit(self.profile.embedding[seen], self.profile.loss[seen]), seen

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: str) -> float:
        enc = self.setup.encoded[split]
        device = self.setup.device
        self.interface.eval()
        correct = 0
        n = enc["input_ids"].shape[0]
        for start in range(0, n, self.config.eval_batch_size):
            sl = slice(start, start + self.config.eval_batch_size)
            mask = enc["attention_mask"][sl].to(device)
            width = int(mask.sum(1).max())
            types = enc["token_type_ids"][sl, :width].to(device) if "token_type_ids" in enc else None
            with self.autocast:
                out = self.interface.student_forward(self.interface.embed(enc["input_ids"][sl, :width].to(device)),
                                                     mask[:, :width], token_type_ids=types)
            correct += int((out.logits.argmax(-1).cpu() == enc["labels"][sl]).sum())
        self.interface.train()
        return correct / n

    # ------------------------------------------------------------------ the loop
    def _analysis_due(self, end_of_epoch: bool) -> bool:
        if self.mode == "kd":
            return False
        if self.config.analysis_every is not None:
            # No round after the last step: nothing would train on what it makes.
            return (not end_of_epoch and self.global_step % self.config.analysis_every == 0
                    and self.global_step < self.total_steps)
        return end_of_epoch and self.global_step < self.total_steps

    def train(self) -> dict:
        from tqdm.auto import tqdm

        config = self.config
        bar = tqdm(total=self.total_steps, initial=self.global_step, desc=f"distill [{self.mode}]", unit="step",
                   disable=not config.progress)
        with _StopRequest() as stop:
            while not self.done and self.global_step < self.total_steps:
                order = torch.randperm(self.n_train, generator=torch.Generator().manual_seed(
                    config.seed * 100_003 + self.epoch))
                started = time.perf_counter()
                with self.timer.measure("train"):
                    while self.step_in_epoch < self.steps_per_epoch and self.global_step < self.total_steps:
                        s = self.step_in_epoch * config.batch_size
                        loss = self.train_step(order[s:s + config.batch_size])
                        self.step_in_epoch += 1
                        self.global_step += 1
                        bar.update(1)
                        if self.global_step % config.log_every == 0 or self.global_step == 1:
                            bar.set_postfix(loss=f"{loss:.4f}", pool=len(self.pool))
                            self.metrics.log(kind="train", mode=self.mode, epoch=self.epoch, step=self.global_step,
                                             loss=loss, lr=self.scheduler.get_last_lr()[0], pool=len(self.pool))
                        if self._analysis_due(end_of_epoch=False):
                            self.analysis_round_now()
                        after_step(self)
                        if stop.requested:
                            bar.close()
                            self.save()
                            raise TrainingInterrupted(self._resume_hint())
                    epoch_finished = self.step_in_epoch >= self.steps_per_epoch or self.global_step >= self.total_steps
                    if epoch_finished and self._analysis_due(end_of_epoch=True):
                        self.analysis_round_now()
                accuracy = self.evaluate("validation")
                self.metrics.log(kind="eval", mode=self.mode, split="validation", epoch=self.epoch + 1,
                                 step=self.global_step, accuracy=accuracy,
                                 epoch_seconds=time.perf_counter() - started)
                self.epoch += 1
                self.step_in_epoch = 0
                self.done = self.global_step >= self.total_steps
                if self.done:
                    self._finish()
                self.save()
        bar.close()
        return self.results()

    def _finish(self) -> None:
        train_seconds = self.timer.seconds.get("train", 0.0)
        self.metrics.log(
            kind="final", mode=self.mode, split="test", accuracy=self.evaluate("test"),
            validation_accuracy=self.metrics.last("eval")["accuracy"], steps=self.global_step, epochs=self.epoch,
            real_examples=self.examples_seen["real"], synthetic_examples=self.examples_seen["synthetic"],
            train_seconds=train_seconds,
            examples_per_second=self.examples_seen["real"] / train_seconds if train_seconds > 0 else None,
            analysis_share=self.timer.share("analysis"), synthesis_share=self.timer.share("synthesis"),
            analysis_rounds=self.analysis_round)
        from .models import save_interface

        teacher_dir = Path(self.setup.teacher_name)
        save_interface(self.interface, self.trained_dir, tokenizer=self.setup.tokenizer,
                       teacher_path=str(teacher_dir) if teacher_dir.is_dir() else None)

    @property
    def trained_dir(self) -> Path:
        """The trained student, adapter, and teacher location: what ``sage-fast export`` reads."""
        return self.out_dir / "trained"

    def results(self) -> dict:
        final = self.metrics.last("final") or {}
        return {"mode": self.mode, "out_dir": str(self.out_dir), **{k: v for k, v in final.items() if k != "kind"}}

    def _resume_hint(self) -> str:
        return (f"interrupted at step {self.global_step}/{self.total_steps}; a checkpoint is in {self.checkpoint_path}. "
                f"Resume with: sage-fast distill --resume --output-dir {self.out_dir.parent}")


# ------------------------------------------------------------------------------------------ driver
def default_output_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def run(config: DistillConfig, *, resume: bool = False, log=print) -> dict:
    """Train the main mode and every baseline in ``config.compare``; returns the summary that is
    also written to ``<output_dir>/results.json``."""
    out_dir = Path(config.output_dir) if config.output_dir else default_output_dir()
    config.output_dir = str(out_dir)
    if not resume and any((out_dir / m / ckpt.CHECKPOINT_NAME).exists() for m in [config.mode, *config.compare]):
        raise DataError(f"{out_dir} already holds a run; pass --resume to continue it, or choose another --output-dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save(out_dir)
    setup = build_setup(config, log=log)
    rows, trained = [], {}
    for mode in [config.mode, *config.compare]:
        mode_run = ModeRun(setup, mode, out_dir / mode, log=log)
        if resume and mode_run.checkpoint_path.exists():
            mode_run.load(ckpt.load(mode_run.checkpoint_path))  # on the CPU: RNG states must stay there
            log(f"[{mode}] resuming at step {mode_run.global_step}/{mode_run.total_steps}")
        rows.append(mode_run.train())
        trained[mode] = str(mode_run.trained_dir)
        log(f"[{mode}] test accuracy {rows[-1]['accuracy']:.4f}; trained student in {mode_run.trained_dir}")
    summary = {"output_dir": str(out_dir), "teacher": setup.teacher_name, "task": setup.data.task,
               "teacher_validation_accuracy": setup.teacher_metrics.get("validation_accuracy_vector"),
               "teacher_test_accuracy": setup.teacher_metrics.get("test_accuracy_vector"), "modes": rows,
               "trained": trained}
    (out_dir / RESULTS_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    table = results_table(summary)
    (out_dir / "results.txt").write_text(table + "\n")
    summary["table"] = table
    return summary


def results_table(summary: dict) -> str:
    rows = [{"name": "teacher", "validation_accuracy": summary["teacher_validation_accuracy"],
             "accuracy": summary["teacher_test_accuracy"]}]
    rows += [{"name": r["mode"], **r} for r in summary["modes"]]
    return format_table(rows, [
        ("name", "model", "{}"), ("validation_accuracy", "val acc", "{:.4f}"), ("accuracy", "test acc", "{:.4f}"),
        ("examples_per_second", "real ex/s", "{:.1f}"), ("synthetic_examples", "synthetic seen", "{:d}"),
        ("analysis_share", "analysis", "{:.1%}"), ("synthesis_share", "synthesis", "{:.1%}"),
    ])
