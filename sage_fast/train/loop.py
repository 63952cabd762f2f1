"""The SAGE training driver (see DESIGN.md, "The SAGE loop"): step, evaluation, checkpoints.

Per step: a batch of real examples, whose teacher outputs come from the on-disk cache, mixed with
synthetic rows from the synthesizer's pool; ``SAGELoss`` on both; the real rows' per-example losses
and pooled student embeddings go to the synthesizer (``SAGESynthesizer.observe``). Every
``analysis_every`` steps (by default a third of an epoch) the synthesizer runs a round:
the analysis on the rows seen so far, pairs from high-loss regions (mode ``sage``) or uniform ones
(mode ``random``), interpolation, labels from the teacher through the vector interface, the pool.
Mode ``kd`` has no synthesizer.

Evaluation is on real text only: validation accuracy each epoch, test accuracy at the end. Each
epoch ends with an atomic checkpoint; Ctrl-C or SIGTERM (what cluster schedulers send before
pre-empting a job) stops at the end of the current step, writes a checkpoint and says how to resume.
One process at a time trains in a run folder (``run_lock``). A non-finite training loss, checked
where the loss is logged anyway (no host synchronisation per step), stops the run and never
overwrites the last checkpoint with a non-finite state. On CPU with a fixed seed, a resumed run
gives the same final metrics as an uninterrupted one: data order depends only on (seed, epoch), and
every random stream (torch's global one for dropout, the synthesizer's generators) is checkpointed.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..assets import cache_root
from ..devices import resolve_device
from ..errors import UsageError
from ..distributed import (SINGLE, DistributedError, PeerLost, World, close_world, collective_failed, init_world,
                           launched_world)
from ..distributed import split_sizes as part_sizes  # how a step's rows[j::parts] are dealt out
from ..nn import SAGELoss, SAGELossConfig
from ..regions import pooled_embedding, warm_up_in_background
from ..synthesis import (BackgroundRounds, RoundRecord, SAGESynthesizer, SynthesisConfig, default_analysis_interval,
                         partner_classes, used_lengths)
from ..synthesis.volume import rows_per_round
from . import DataError, ModelError, require_transformers
from . import checkpoint as ckpt
from . import teacher_cache
from .config import DistillConfig
from .data import encode, load_task
from .generator_inputs import generator_inputs
from .metrics import MetricsLog, Timer, format_table
from .models import (VectorInterface, _first_line, load_classifier, load_tokenizer, save_interface, saved_label_count,
                     student_from_config, student_from_teacher)
from .run_lock import RunLock
from .teacher import TeacherSettings, fine_tune_teacher, read_teacher_metrics

DEFAULT_TEACHER_BASE = "minilm"
RESULTS_FILE = "results.json"
RANK_SEED_STRIDE = 1_000_003  # rank r's torch / numpy / python streams start at seed + r * this


class Stopped(KeyboardInterrupt):
    """A stop signal, Ctrl-C's SIGINT or SIGTERM (``signum`` says which), that ended the run where
    it was: nothing was saved beyond the last checkpoint."""

    def __init__(self, *args, signum: int = signal.SIGINT):
        super().__init__(*args)
        self.signum = signum


class TrainingInterrupted(Stopped):
    """Ctrl-C or SIGTERM during training, at the end of a step: a checkpoint was written; the
    message says how to resume."""


class NonFiniteTraining(RuntimeError):
    """The training loss or the weights became non-finite: the run stopped and kept its last
    checkpoint; the message names the mode and the step."""


def default_cache_dir() -> Path:
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
    world: World = SINGLE


def _check_teacher_labels(teacher, num_labels: int, name: str) -> None:
    if int(teacher.config.num_labels) != num_labels:
        raise ModelError(f"the teacher {name} has {teacher.config.num_labels} labels but the task has {num_labels}; "
                         "use a teacher fine-tuned on this task, or leave --teacher unset to fine-tune one")


def build_setup(config: DistillConfig, log=print, *, world: World = SINGLE, device: torch.device | None = None) -> Setup:
    """Data, teacher, tokenizer and the teacher's cached outputs. Under several processes rank 0
    fine-tunes the teacher and fills the caches first; the others then read them."""
    device = resolve_device(config.device) if device is None else device
    task = config.task if config.train_file is None else Path(config.train_file).name.split(".")[0]
    data = load_task(task, train_file=config.train_file, eval_file=config.eval_file,
                     text_column=config.text_column, text_pair_column=config.text_pair_column,
                     label_column=config.label_column, max_train_examples=config.max_train_examples or None,
                     max_eval_examples=config.max_eval_examples or None, seed=config.seed)
    log(f"data: {data.summary()}")
    teacher_metrics = {}
    if config.teacher is None:
        with world.main_first():
            folder = fine_tune_teacher(DEFAULT_TEACHER_BASE, data, device=device, progress=config.progress, log=log,
                                       settings=TeacherSettings(epochs=config.teacher_epochs, lr=config.teacher_lr,
                                                                max_length=config.max_length, seed=config.seed))
        teacher_name = str(folder)
        teacher_metrics = read_teacher_metrics(folder)
    else:
        teacher_name = config.teacher
        saved_labels = saved_label_count(teacher_name)
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
    with world.main_first():
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
                 student, layer_map, teacher_metrics, world)


def build_student(spec: str, teacher, num_labels: int):
    """``from-teacher:K``, a config file (``.json``), or a model folder / hub id."""
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
    saved_labels = saved_label_count(spec)
    if saved_labels is not None and saved_labels != num_labels:
        raise ModelError(f"the student {spec} was trained with {saved_labels} labels but the teacher and task have "
                         f"{num_labels}; teacher and student must predict the same label set")
    return load_classifier(spec, num_labels)


def build_loss(config: DistillConfig, setup: Setup, student) -> SAGELoss:
    teacher = setup.teacher
    return SAGELoss(SAGELossConfig(
        alpha=config.alpha, temperature=config.temperature, beta=config.beta,
        layer_map=setup.layer_map if config.beta > 0 else None,
        num_student_layers=student.config.num_hidden_layers, num_teacher_layers=teacher.config.num_hidden_layers,
        student_hidden_size=student.config.hidden_size, teacher_hidden_size=teacher.config.hidden_size,
    ))


def linear_schedule(optimizer, total_steps: int, warmup_ratio: float, *, done_steps: int = 0):
    """Linear warm-up over ``int(warmup_ratio * total_steps)`` steps, then linear decay to 0, for an
    optimizer that has taken ``done_steps`` steps (a resumed or stretched run).

    This is transformers' ``get_linear_schedule_with_warmup`` one step ahead (``warmup + 1`` and
    ``total_steps + 1`` steps, started at step 1): theirs gives step ``s`` the factor ``s / warmup``,
    so the first step trains at a learning rate of 0; here step ``s`` gets ``(s + 1) / (warmup + 1)``
    in the warm-up and ``(total - s) / (total - warmup)`` after it."""
    transformers = require_transformers()  # imported on use: the driver's optional dependency
    warmup = int(warmup_ratio * total_steps)
    for group in optimizer.param_groups:  # a scheduler started past step 0 needs the base rate
        group.setdefault("initial_lr", group["lr"])
    return transformers.get_linear_schedule_with_warmup(optimizer, warmup + 1, total_steps + 1,
                                                        last_epoch=done_steps)


def synthesis_config(config: DistillConfig, mode: str, device: torch.device, *, num_examples: int | None = None,
                     steps_per_epoch: int | None = None, interval: int | None = None) -> SynthesisConfig:
    """The synthesizer's settings for ``mode`` (``sage`` or ``random``) from the driver's config;
    with ``synthetic_volume``, each round's rows follow from the run's rows and schedule."""
    per_round, pool_size = config.synthetic_per_round, config.pool_size
    if config.synthetic_volume is not None:
        # Without the run's rows and schedule (the loss map of a finished run), the flag's round size.
        if None not in (num_examples, steps_per_epoch, interval):
            per_round = rows_per_round(config.synthetic_volume, num_examples, steps_per_epoch, interval)
        pool_size = max(pool_size, per_round)
    return SynthesisConfig(
        mode=mode, synthetic_per_round=per_round, pool_size=pool_size,
        pool_policy=config.pool_policy, quantile=config.quantile, n_neighbors=config.n_neighbors,
        lam_low=config.lam_low, lam_high=config.lam_high, noise_std=config.noise_std, seed=config.seed,
        device=device, profile_decay=config.profile_decay, partners=config.partners, generator=config.generator,
        substitute_share=config.substitute_share, substitute_top_k=config.substitute_top_k,
        substitute_span=config.substitute_span, boundary_steps=config.boundary_steps,
        boundary_step_size=config.boundary_step_size)


def analysis_interval(config: DistillConfig, steps_per_epoch: int) -> int:
    """Steps between analysis rounds: ``analysis_every``, or by default three rounds an epoch
    (``default_analysis_interval``)."""
    if config.analysis_every is not None:
        return config.analysis_every
    return default_analysis_interval(steps_per_epoch)


def resolved_lag(config: DistillConfig, steps_per_epoch: int) -> int:
    """Steps a round runs beside training before its rows join the pool: ``analysis_lag``, or by
    default every step between rounds but the last (at least 1). With three rounds an epoch the
    offline default has 10 steps between rounds and a round takes the worker about 3 s beside
    training (UMAP 0.7 s, the teacher's labels 2.4 s): a third of the interval left training
    waiting for 17% of its time, the whole interval leaves it waiting for none. The pool keeps
    earlier rounds' rows meanwhile, so a later join costs little."""
    if config.analysis_lag is not None:
        return config.analysis_lag
    return max(1, analysis_interval(config, steps_per_epoch) - 1)


def profile_signal(config: DistillConfig, per_example: torch.Tensor, student_logits: torch.Tensor,
                   teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What the error profile records for each real row: its SAGE loss (``loss``); only the part
    synthetic rows can teach, the student's disagreement with the teacher ``T^2 KL(p_t || p_s)`` at
    the distillation temperature (``disagreement``: the cross-entropy on gold labels also rises where
    the labels are noisy, which the teacher's labels on synthetic rows cannot fix); or the loss where
    the teacher's prediction is the gold label and 0 where it is not (``trusted``: on the offline
    pair the student's hardest rows are rows the teacher gets wrong three times as often as the
    rest, so loss regions there collect synthetic rows under wrong labels; the disagreement avoids
    that but has much weaker regions, see docs/results.md)."""
    if config.profile_signal == "loss":
        return per_example
    if config.profile_signal == "trusted":
        return torch.where(teacher_logits.argmax(-1) == labels, per_example, torch.zeros_like(per_example))
    t = config.temperature
    log_p_t = torch.log_softmax(teacher_logits.float() / t, dim=-1)
    log_p_s = torch.log_softmax(student_logits.float() / t, dim=-1)
    return (t * t) * (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)


def _no_buffer_sync_per_forward(ddp_class) -> dict:
    """DDP's setting that stops it re-sending buffers before every forward: the student's buffers
    (position ids) never change in training. Newer torch names it ``forward_sync_buffers`` and
    warns on every rank, every mode, about the older ``broadcast_buffers``."""
    if "forward_sync_buffers" in inspect.signature(ddp_class.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


class _StopRequest:
    """First Ctrl-C or SIGTERM: finish the current step, checkpoint, stop. A second Ctrl-C stops at
    once (a person who does not want to wait); a second SIGTERM does not, since it is no one's
    impatience: under a scheduler that signals every process of a job, each torchrun worker gets the
    scheduler's SIGTERM and then torchrun's own, and must still checkpoint (SIGKILL is the hard stop)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: signals cannot reach us anyway
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise Stopped(signum=signum)
        if not self.requested:
            self.requested, self.signum = True, signum

    def __exit__(self, exc_type, exc, tb):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        if isinstance(exc, TrainingInterrupted) and self.signum is not None:
            exc.signum = self.signum
        return False


@contextlib.contextmanager
def _sigterm_stops():
    """Outside the training steps (data, teacher, the teacher's outputs), SIGTERM stops the run as
    Ctrl-C does, with a message, instead of ending the process without one."""
    def stop(signum, frame):
        raise Stopped(signum=signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def after_step(run: "ModeRun") -> None:
    """Called after every optimiser step; a seam for tests that simulate interruptions."""


# ------------------------------------------------------------------------------------------ student
class Student:
    """The student behind the vector interface, with its loss, on the setup's data: everything a
    mode computes without an optimizer (evaluation, a profile pass, the teacher's labels)."""

    def __init__(self, setup: Setup):
        self.setup, self.config, self.device = setup, setup.config, setup.device
        student = copy.deepcopy(setup.student_init)
        self.interface = VectorInterface(setup.teacher, student).to(self.device)
        self.loss_fn = build_loss(self.config, setup, student).to(self.device)
        self.n_train = setup.encoded["train"]["input_ids"].shape[0]
        # Tokens each training row uses, on the host: a step trims its batch's shared padding from
        # these, never from the device's masks (reading those back would make every step wait).
        self.lengths = used_lengths(setup.encoded["train"]["attention_mask"])

    @property
    def autocast(self):
        """A new autocast context on each use: an autocast object keeps the state it restores on
        itself, so one shared by the training thread and a round's worker thread would mix them up."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the training device; on CUDA by a pinned, asynchronous copy, so the host
        goes on queueing work instead of waiting for the copy."""
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    @property
    def embedding_dim(self) -> int:
        return self.interface.student.config.hidden_size

    def parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer trains: the student, the adapter, the loss's projections."""
        return self.interface.trainable_parameters() + [p for p in self.loss_fn.parameters() if p.requires_grad]

    def state_dict(self) -> dict:
        return {"student": self.interface.student.state_dict(), "adapter": self.interface.adapter.state_dict(),
                "loss": self.loss_fn.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.interface.student.load_state_dict(state["student"])
        self.interface.adapter.load_state_dict(state["adapter"])
        self.loss_fn.load_state_dict(state["loss"])

    def real_batch(self, rows: torch.Tensor) -> dict:
        """Training rows ``rows`` (a host index) with their cached teacher outputs, on the device;
        ``width``: the most tokens any of them uses (a Python int)."""
        enc = self.setup.encoded["train"]
        cached = self.setup.teacher_outputs["train"]
        move = self.to_device
        batch = {
            "input_ids": move(enc["input_ids"][rows]), "mask": move(enc["attention_mask"][rows]),
            "labels": move(enc["labels"][rows]), "ids": move(enc["ids"][rows]),
            "logits": move(cached["logits"][rows]),
            "hidden": {k: move(v[rows]) for k, v in cached["hidden"].items()},
            "width": int(self.lengths[rows].max()),  # host tensors: no device read
        }
        if "token_type_ids" in enc:
            batch["token_type_ids"] = move(enc["token_type_ids"][rows])
        return batch

    def vectors_of(self, ids: torch.Tensor):
        """The synthesizer's view of real rows: teacher-space vectors ``[n, L, d_t]`` and masks."""
        rows = ids.cpu()  # example ids are positions in the encoded training split
        enc = self.setup.encoded["train"]
        return (self.interface.embed(enc["input_ids"][rows].to(self.device)),
                enc["attention_mask"][rows].to(self.device))

    @torch.no_grad()
    def label(self, vectors: torch.Tensor, mask: torch.Tensor):
        """The teacher's logits (float32) and cached hidden layers (float16) on synthetic vectors."""
        logits, hidden = [], {k: [] for k in self.setup.teacher_layers}
        step = self.config.label_batch_size or self.config.eval_batch_size
        for start in range(0, vectors.shape[0], step):
            with self.autocast:
                out = self.interface.teacher_forward(vectors[start:start + step], mask[start:start + step],
                                                     output_hidden_states=bool(hidden))
            logits.append(out.logits.float())
            for k in hidden:
                hidden[k].append(out.hidden_states[k].to(torch.float16))
        return torch.cat(logits), {k: torch.cat(v) for k, v in hidden.items()}

    @torch.no_grad()
    def profile_batches(self):
        """``(ids, per-example loss, pooled embedding)`` for every training row, one no-grad pass
        in eval mode: what ``SAGESynthesizer.refresh`` takes."""
        n, step = self.n_train, self.config.eval_batch_size
        self.interface.eval()
        try:
            for start in range(0, n, step):
                real = self.real_batch(torch.arange(start, min(n, start + step)))
                width = real["width"]
                mask = real["mask"][:, :width]
                types = real.get("token_type_ids")
                with self.autocast:
                    out = self.interface.student_forward(self.interface.embed(real["input_ids"][:, :width]), mask,
                                                         output_hidden_states=True,
                                                         token_type_ids=None if types is None else types[:, :width])
                    teacher = {"logits": real["logits"],
                               "hidden_states": {k: v[:, :width].float() for k, v in real["hidden"].items()} or None}
                    result = self.loss_fn(out, teacher, labels=real["labels"], attention_mask=mask)
                signal = profile_signal(self.config, result.per_example.float(), out.logits, real["logits"],
                                        real["labels"])
                yield real["ids"], signal, pooled_embedding(out.hidden_states[-1], mask)
        finally:
            self.interface.train()

    @torch.no_grad()
    def evaluate(self, split: str) -> float:
        """Accuracy on a real split (validation or test); under several processes each rank counts
        its share of the rows and the counts are summed (every rank gets the same accuracy)."""
        enc = self.setup.encoded[split]
        device, world = self.device, self.setup.world
        self.interface.eval()
        correct = 0
        n = enc["input_ids"].shape[0]
        share = world.share(n)
        for start in range(share.start, share.stop, self.config.eval_batch_size):
            sl = slice(start, min(share.stop, start + self.config.eval_batch_size))
            mask = enc["attention_mask"][sl].to(device)
            width = int(used_lengths(enc["attention_mask"][sl]).max())  # from the host copy
            types = enc["token_type_ids"][sl, :width].to(device) if "token_type_ids" in enc else None
            with self.autocast:
                out = self.interface.student_forward(self.interface.embed(enc["input_ids"][sl, :width].to(device)),
                                                     mask[:, :width], token_type_ids=types)
            correct += int((out.logits.argmax(-1).cpu() == enc["labels"][sl]).sum())
        self.interface.train()
        if world.distributed:
            correct = int(world.all_reduce_sum(torch.tensor([correct], device=device)).item())
        return correct / n


class StudentStep(torch.nn.Module):
    """The student's forward and the loss as one module: what DistributedDataParallel wraps, so the
    student, the adapter and the loss's projections are all-reduced together."""

    def __init__(self, interface: VectorInterface, loss_fn: SAGELoss):
        super().__init__()
        self.interface, self.loss_fn = interface, loss_fn

    def forward(self, vectors, mask, token_types, teacher_outputs, labels):
        out = self.interface.student_forward(vectors, mask, output_hidden_states=True, token_type_ids=token_types)
        return out, self.loss_fn(out, teacher_outputs, labels=labels, attention_mask=mask)

    def ignored_by_ddp(self) -> list[str]:
        """Names DDP must neither broadcast nor reduce: the frozen teacher (the same on every rank)
        and the student's own word table, which the vector interface never reads."""
        unused = {id(p) for p in self.interface.student.get_input_embeddings().parameters()}
        return [name for name, p in self.named_parameters(remove_duplicate=False)
                if name.startswith("interface.teacher.") or id(p) in unused] + \
               [name for name, _ in self.named_buffers() if name.startswith("interface.teacher.")]


def rank_device(config: DistillConfig, world: World) -> torch.device:
    """This process's device: under several processes on GPUs, the GPU of its ``LOCAL_RANK``."""
    if not world.distributed or config.device == "cpu":
        return resolve_device(config.device)
    if config.device not in ("auto", "cuda"):
        raise DistributedError(f"under torchrun each process takes the GPU of its LOCAL_RANK, so --device must be "
                               f"auto, cuda or cpu, got {config.device!r}")
    if not torch.cuda.is_available():
        if config.device == "cuda":
            return resolve_device("cuda")  # refused there, with the usual message
        return torch.device("cpu")
    return resolve_device(f"cuda:{world.local_rank}")


# ------------------------------------------------------------------------------------------ one mode
class ModeRun:
    """One mode (sage, kd or random) trained from ``setup``, in ``out_dir``."""

    def __init__(self, setup: Setup, mode: str, out_dir: Path, log=print, read_only: bool = False):
        self.setup, self.config, self.mode, self.out_dir, self.log = setup, setup.config, mode, Path(out_dir), log
        config, device = self.config, setup.device
        self.world = world = setup.world
        # Every rank starts the same weights (DDP also broadcasts rank 0's); dropout differs by rank.
        ckpt.seed_everything(config.seed + RANK_SEED_STRIDE * world.rank)
        self.model = Student(setup)
        self.interface = self.model.interface
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.step_module = StudentStep(self.interface, self.model.loss_fn)
        self.ddp = None
        if world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                self.step_module, self.step_module.ignored_by_ddp())
            self.ddp = DistributedDataParallel(self.step_module, device_ids=[device] if device.type == "cuda" else None,
                                               **_no_buffer_sync_per_forward(DistributedDataParallel))
        # A step's rows are dealt out to world.size * grad_accumulation parts; part j = rank * K + k.
        self.accumulation = config.grad_accumulation
        self.parts = world.size * self.accumulation
        if config.batch_size % self.parts:
            raise DistributedError(
                f"batch-size ({config.batch_size}) must split evenly over {world.size} process(es) x "
                f"{self.accumulation} micro-batch(es): use a multiple of {self.parts}")
        self.n_train = self.model.n_train
        # A last batch too small to give every part a row is left out (its rows come back next epoch).
        full, rest = divmod(self.n_train, config.batch_size)
        self.steps_per_epoch = full + (rest >= self.parts)
        if self.steps_per_epoch == 0:
            raise DataError(f"{self.n_train} training rows cannot give each of the {self.parts} parts of a step a row")
        self.total_steps = self.steps_per_epoch * config.epochs
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.scheduler = linear_schedule(self.optimizer, self.total_steps, config.warmup_ratio)
        self.analysis_interval = analysis_interval(config, self.steps_per_epoch)
        self.synthesizer = None if mode == "kd" else SAGESynthesizer(
            synthesis_config(config, mode, device, num_examples=self.n_train, steps_per_epoch=self.steps_per_epoch,
                             interval=self.analysis_interval),
            num_examples=self.n_train, embedding_dim=self.model.embedding_dim, world=world,
            inputs=generator_inputs(self.interface, setup.tokenizer, setup.encoded["train"],
                                    lambda: self.model.autocast, batch_size=config.eval_batch_size,
                                    temperature=config.temperature))
        self.analysis_lag = resolved_lag(config, self.steps_per_epoch)
        self.background = None if self.synthesizer is None or self.analysis_lag == 0 else BackgroundRounds(
            self.synthesizer, self.model.vectors_of, self.model.label, lag=self.analysis_lag,
            plot_path=self._loss_map_path if world.is_main else None)
        self.epoch = 0            # completed epochs
        self.step_in_epoch = 0    # completed steps of the current epoch
        self.global_step = 0
        self.examples_seen = {"real": 0, "synthetic": 0}
        self.timer = Timer()
        self.done = False
        # Nothing is written to the file before the first record: a failed resume leaves it whole.
        # Every rank keeps the records (they are the same); rank 0 writes them.
        self.read_only = read_only or not world.is_main
        self.metrics = MetricsLog(None if self.read_only else self.out_dir / "metrics.jsonl")
        self.checkpoint_step: int | None = None  # the step of the checkpoint on disk, if this run has one

    @property
    def analysis_rounds(self) -> int:
        return 0 if self.synthesizer is None else self.synthesizer.rounds

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / ckpt.CHECKPOINT_NAME

    def state_dict(self) -> dict:
        return {
            "format": ckpt.FORMAT_VERSION, "mode": self.mode, "config": self.config.to_dict(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "examples_seen": dict(self.examples_seen), "done": self.done,
            **self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": ckpt.rng_state(),
            "synthesizer": None if self.synthesizer is None else self.synthesizer.state_dict(),
            "round_in_flight": None if self.background is None else self.background.state_dict(),
            "metrics": self.metrics.records, "timer": dict(self.timer.seconds),
            "total_steps": self.total_steps, "world_size": self.world.size,
            "analysis_interval": self.analysis_interval,
        }

    def save(self) -> Path:
        """The checkpoint, written once (rank 0), atomically, with every rank's random state; every
        rank calls it at the same step (it gathers those states)."""
        self._check_finite_weights()  # a non-finite state never replaces the last good checkpoint
        state = self.state_dict()
        if self.world.distributed:
            state["rank_rng"] = self.world.all_gather_objects(state["rng"])
        if self.world.is_main:
            ckpt.save_atomic(state, self.checkpoint_path)
        self.checkpoint_step = self.global_step
        return self.checkpoint_path

    def load(self, state: dict) -> None:
        if state["mode"] != self.mode:
            raise ckpt.CheckpointError(f"{self.checkpoint_path} holds a {state['mode']!r} run, not {self.mode!r}")
        saved_world = state.get("world_size", 1)
        if saved_world != self.world.size:
            raise ckpt.CheckpointError(
                f"{self.checkpoint_path} was written by a run of {saved_world} process(es), and this one has "
                f"{self.world.size}: each process's random state is saved, so resume with {saved_world} "
                f"(torchrun --nproc-per-node {saved_world}, or no torchrun for 1)")
        state = _upgraded(state)
        self.model.load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["total_steps"] != self.total_steps:  # more epochs or steps asked for: stretch the schedule
            self.scheduler = linear_schedule(self.optimizer, self.total_steps, self.config.warmup_ratio,
                                             done_steps=state["global_step"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.examples_seen = dict(state["examples_seen"])
        self.done = state["done"] and self.global_step >= self.total_steps
        if self.synthesizer is not None:
            self.synthesizer.load_state_dict(state["synthesizer"])
        self._load_round_in_flight(state.get("round_in_flight"))
        if "analysis_interval" not in state and self.config.analysis_every is None:
            # Started when the default was one round at each epoch's end (but the last): it ends on
            # the schedule it began with.
            self.analysis_interval = None
            if self.config.analysis_lag is None and self.background is not None:
                self.analysis_lag = self.background.lag = max(1, self.steps_per_epoch // 3)  # that default's lag
        ckpt.set_rng_state(state["rank_rng"][self.world.rank] if self.world.distributed else state["rng"])
        self.timer = Timer(state["timer"])
        self.metrics = MetricsLog(None if self.read_only else self.out_dir / "metrics.jsonl", state["metrics"])
        self.checkpoint_step = self.global_step

    # ------------------------------------------------------------------ one step
    def train_step(self, rows: torch.Tensor) -> torch.Tensor:
        """One optimiser step on the real rows ``rows`` (a host index: the whole step's, over every
        process) and a draw from the pool. The rows are dealt out to ``world.size * grad_accumulation``
        parts, ``rows[j::parts]``, and so is the draw; this process trains on its parts, part
        ``rank * K + k`` as micro-batch ``k``, each loss scaled by ``1 / K`` (DDP averages over the
        processes). Returns the mean loss of this process's parts as a detached 0-d tensor on the
        device: the caller reads it only where it logs, so on CUDA the host queues the next step
        without waiting for this one."""
        config, k_parts = self.config, self.accumulation
        first = self.world.rank * k_parts
        synthetic = (None if self.synthesizer is None
                     else self.synthesizer.sample(config.synthetic_per_batch, parts=k_parts))
        drawn = 0 if synthetic is None else min(config.synthetic_per_batch, self.pool_size)
        total_loss, observed = None, []
        for k in range(k_parts):
            last = k == k_parts - 1
            # DDP all-reduces the gradients once, in the last micro-batch's backward
            sync = contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()
            with sync:
                loss, seen = self._micro_batch(rows[first + k::self.parts], None if synthetic is None else synthetic[k])
                (loss / k_parts).backward()
            observed.append(seen)
            total_loss = loss.detach() if total_loss is None else total_loss + loss.detach()
        torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.synthesizer is not None:
            with torch.no_grad():
                ids, signal, embeddings, classes = (torch.cat(parts) if parts[0] is not None else None
                                                    for parts in zip(*observed))
                # every rank's row count this step, from the step's size alone: no device read
                counts = part_sizes(rows.shape[0], self.parts)
                sizes = [sum(counts[r * k_parts:(r + 1) * k_parts]) for r in range(self.world.size)]
                self.synthesizer.observe(ids, signal, embeddings, classes=classes, sizes=sizes)
        self.examples_seen["real"] += rows.shape[0]
        self.examples_seen["synthetic"] += drawn
        return total_loss / k_parts

    def _micro_batch(self, rows: torch.Tensor, synthetic):
        """Forward and loss of one micro-batch (real ``rows``, ``synthetic`` rows or None); returns
        the loss and what the profile records of its real rows: (ids, signal, embeddings, classes)."""
        config = self.config
        real = self.model.real_batch(rows)
        vectors = self.interface.embed(real["input_ids"])
        mask, logits, hidden = real["mask"], real["logits"], dict(real["hidden"])
        labels = real["labels"]
        token_types = real.get("token_type_ids")
        n_real = vectors.shape[0]
        if synthetic is not None:
            vectors = torch.cat([vectors, synthetic.vectors.to(vectors.dtype)])
            mask = torch.cat([mask, synthetic.mask.to(mask.dtype)])
            logits = torch.cat([logits, synthetic.logits])
            hidden = {k: torch.cat([v, synthetic.hidden[k].to(v.dtype)]) for k, v in hidden.items()}
            labels = torch.cat([labels, synthetic.loss_labels(self.model.loss_fn.config.ignore_index).to(labels)])
            if token_types is not None:  # synthetic rows were labelled with token type 0 throughout
                token_types = torch.cat([token_types, token_types.new_zeros(synthetic.mask.shape)])
        # Trim the padding every row of this batch shares; the widths are known on the host.
        width = real["width"] if synthetic is None else max(real["width"], synthetic.width)
        vectors, mask = vectors[:, :width], mask[:, :width]
        hidden = {k: v[:, :width].float() for k, v in hidden.items()}
        if token_types is not None:
            token_types = token_types[:, :width]
        teacher_outputs = {"logits": logits, "hidden_states": hidden or None}

        self.interface.train()
        with self.model.autocast:
            student_out, result = (self.ddp or self.step_module)(vectors, mask, token_types, teacher_outputs, labels)
        seen = (None, None, None, None)
        if self.synthesizer is not None:
            with torch.no_grad():
                embeddings = pooled_embedding(student_out.hidden_states[-1][:n_real].detach(), mask[:n_real])
                signal = profile_signal(config, result.per_example[:n_real].detach(), student_out.logits[:n_real],
                                        real["logits"], labels[:n_real])
                classes = partner_classes(config.partners, real["logits"], labels[:n_real])
                seen = (real["ids"], signal, embeddings, classes)
        return result.loss, seen

    # ------------------------------------------------------------------ analysis and synthesis
    def _loss_map_path(self, number: int) -> Path:
        return self.out_dir / f"loss_map_round{number:03d}.png"

    def analysis_round_now(self) -> RoundRecord | None:
        """The round due now. Inline (``analysis_lag`` 0) training waits for it and gets its record;
        otherwise its snapshot goes to the worker and its rows join the pool ``analysis_lag`` steps
        later (``finish_round``), and None is returned, as when too few rows have been seen."""
        if self.background is not None and self.background.pending is not None:
            self.finish_round()  # rounds join the pool in order: the one in flight first
        if self.config.refresh_profile:
            with self.timer.measure("analysis"):
                self.synthesizer.refresh(self.model.profile_batches())
        # A round joins the pool analysis_lag steps after its snapshot, or before the last step
        # when fewer remain (inline when none does): a rule of step counts alone, like the lag.
        lag = min(self.analysis_lag, self.total_steps - 1 - self.global_step)
        if self.background is not None and lag > 0:
            with self.timer.measure("analysis"):  # the snapshot: what training pays to start a round
                self.background.start(self.global_step, lag)
            return None
        record = self.synthesizer.round(self.model.vectors_of, self.model.label, step=self.global_step,
                                        plot_path=self._loss_map_path if self.world.is_main else None)
        if record is None:  # too few examples seen yet
            return None
        for category in ("analysis", "synthesis", "labelling", "plot"):
            self._add_seconds(category, getattr(record, f"{category}_seconds"))
        self._log_round(record)
        return record

    def finish_round(self) -> RoundRecord:
        """Add the round in flight to the pool, waiting for its worker if it is not done yet. The
        wait counts as analysis time and the pool's copy as synthesis time, the time training paid;
        the worker's own seconds (``background``) ran beside training."""
        record = self.background.finish(step=self.global_step)
        self._add_seconds("analysis", record.wait_seconds)
        self._add_seconds("synthesis", record.commit_seconds)
        self._add_seconds("background", record.analysis_seconds + record.synthesis_seconds
                          + record.labelling_seconds + record.plot_seconds - record.commit_seconds)
        self._log_round(record)
        return record

    def _add_seconds(self, category: str, seconds: float) -> None:
        self.timer.seconds[category] = self.timer.seconds.get(category, 0.0) + seconds

    def _log_round(self, record: RoundRecord) -> None:
        if record.plot_error:
            self.log(f"no loss map: {record.plot_error}")
        for line in record.decoded:  # rows of real tokens, for a person to judge
            self.log(f"[{self.mode}] round {record.round}: {line}")
        self.metrics.log(kind="analysis", mode=self.mode, round=record.round, step=self.global_step,
                         epoch=self.epoch, examples=record.examples, synthetic=record.synthetic, pool=record.pool_size,
                         threshold=record.threshold, png=record.png, analysis_seconds=record.analysis_seconds,
                         synthesis_seconds=record.synthesis_seconds, labelling_seconds=record.labelling_seconds,
                         snapshot_step=record.snapshot_step, wait_seconds=record.wait_seconds,
                         **({"decoded": record.decoded} if record.decoded else {}))

    def _load_round_in_flight(self, state) -> None:
        if self.background is not None:
            self.background.load_state_dict(state)
        elif state is not None:
            raise ckpt.CheckpointError(
                f"{self.checkpoint_path} holds a round made beside training (analysis-lag > 0), but this run makes "
                "rounds inline (analysis-lag 0): resume with the settings it was started with")

    @property
    def pool_size(self) -> int:
        return 0 if self.synthesizer is None else len(self.synthesizer.pool)

    # ------------------------------------------------------------------ the loop
    def _analysis_due(self, end_of_epoch: bool) -> bool:
        if self.synthesizer is None:
            return False
        if self.analysis_interval is not None:
            due = not end_of_epoch and self.global_step % self.analysis_interval == 0
        else:  # a run started when rounds came at each epoch's end by default
            due = end_of_epoch
        # No round after the last step: nothing would train on what it makes.
        return due and self.global_step < self.total_steps

    def train(self) -> dict:
        """Train to the end (or to a stop request); under several processes a failed collective (a
        rank that died or hung past ``dist_timeout``) ends this rank with :class:`PeerLost`."""
        if not self.world.distributed:
            return self._train()
        try:
            return self._train()
        except RuntimeError as error:
            if isinstance(error, PeerLost) or not collective_failed(error):
                raise
            kept = (f"the last checkpoint, of step {self.checkpoint_step}, is in {self.checkpoint_path}"
                    if self.checkpoint_step is not None else "no checkpoint was written yet")
            raise PeerLost(
                f"[{self.mode}] rank {self.world.rank}: another process of this run stopped or stopped answering "
                f"(no reply within --dist-timeout {self.config.dist_timeout:g} s) at step {self.global_step}; "
                f"{kept}. See that process's own message for why; then start the same torchrun command with "
                f"--resume --output-dir {self.out_dir.parent}. ({_first_line(error)})") from error

    def _stop_agreed(self, stop: "_StopRequest", logging_point: bool) -> bool:
        """Whether to stop after this step. One process stops as soon as asked; several agree first,
        at logging points (where the host reads the loss anyway), so all stop at the same step."""
        if not self.world.distributed:
            return stop.requested
        return logging_point and self.world.any(stop.requested, self.setup.device)

    def _train(self) -> dict:
        config = self.config
        bar = tqdm(total=self.total_steps, initial=self.global_step, desc=f"distill [{self.mode}]", unit="step",
                   disable=not config.progress or not self.world.is_main)
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
                        logging_point = self.global_step % config.log_every == 0 or self.global_step == 1
                        if logging_point:
                            if self.world.distributed:  # the step's loss over every process's parts
                                loss = self.world.all_reduce_sum(loss.clone()) / self.world.size
                            loss = float(loss)  # the step's only host read of the loss, where it is logged
                            self._check_finite_loss(loss)
                            bar.set_postfix(loss=f"{loss:.4f}", pool=self.pool_size)
                            self.metrics.log(kind="train", mode=self.mode, epoch=self.epoch, step=self.global_step,
                                             loss=loss, lr=self.scheduler.get_last_lr()[0], pool=self.pool_size)
                        if self.background is not None and self.background.due(self.global_step):
                            self.finish_round()
                        if self._analysis_due(end_of_epoch=False):
                            self.analysis_round_now()
                        after_step(self)
                        if self._stop_agreed(stop, logging_point):
                            bar.close()
                            self.save()
                            raise TrainingInterrupted(self._resume_hint())
                    epoch_finished = self.step_in_epoch >= self.steps_per_epoch or self.global_step >= self.total_steps
                    if epoch_finished and self._analysis_due(end_of_epoch=True):
                        self.analysis_round_now()
                accuracy = self.model.evaluate("validation")
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
        self._check_finite_weights()  # neither test nor export a student that diverged
        train_seconds = self.timer.seconds.get("train", 0.0)
        self.metrics.log(
            kind="final", mode=self.mode, split="test", accuracy=self.model.evaluate("test"),
            validation_accuracy=self.metrics.last("eval")["accuracy"], steps=self.global_step, epochs=self.epoch,
            real_examples=self.examples_seen["real"], synthetic_examples=self.examples_seen["synthetic"],
            train_seconds=train_seconds,
            examples_per_second=self.examples_seen["real"] / train_seconds if train_seconds > 0 else None,
            analysis_share=self.timer.share("analysis"), synthesis_share=self.timer.share("synthesis"),
            labelling_share=self.timer.share("labelling"), analysis_rounds=self.analysis_rounds)
        teacher_dir = Path(self.setup.teacher_name)
        if self.world.is_main:
            save_interface(self.interface, self.trained_dir, tokenizer=self.setup.tokenizer,
                           teacher_path=str(teacher_dir) if teacher_dir.is_dir() else None)

    @property
    def trained_dir(self) -> Path:
        """The trained student, adapter, and teacher location: what ``sage-fast export`` reads."""
        return self.out_dir / "trained"

    def results(self) -> dict:
        final = self.metrics.last("final") or {}
        return {"mode": self.mode, "out_dir": str(self.out_dir), **{k: v for k, v in final.items() if k != "kind"}}

    # ------------------------------------------------------------------ non-finite values
    # Checked where the host reads values anyway: the loss at each logging point (every log_every
    # steps), the weights once before each checkpoint and before the final test, so a CUDA step never
    # waits on the host for this.
    def _check_finite_loss(self, loss) -> None:
        finite = math.isfinite(float(loss))
        if self.world.distributed:  # every rank stops together, whichever rank's loss it was
            finite = not self.world.any(not finite, self.setup.device)
        if not finite:
            self._stop_non_finite(f"the training loss is {float(loss)} at step {self.global_step}"
                                  + (f" on rank {self.world.rank}" if self.world.distributed else ""))

    def _check_finite_weights(self) -> None:
        params = [p.detach() for p in self.model.parameters()]
        if params and not bool(torch.stack([p.isfinite().all() for p in params]).all()):
            self._stop_non_finite(f"the weights hold non-finite values after step {self.global_step}")

    def _stop_non_finite(self, what: str) -> None:
        if self.checkpoint_step is None:
            kept = "no checkpoint was written before it"
        else:
            kept = f"the last checkpoint, of step {self.checkpoint_step}, is kept unchanged in {self.checkpoint_path}"
        message = (f"[{self.mode}] {what}: training diverged, so it stopped; {kept}. Usual causes: a learning rate "
                   f"too high for this model (--lr), or non-finite values in the data or the teacher's outputs. "
                   f"Start again with other settings in a new --output-dir.")
        self.metrics.log(kind="error", mode=self.mode, step=self.global_step, message=message)
        raise NonFiniteTraining(message)

    def _resume_hint(self) -> str:
        return (f"interrupted at step {self.global_step}/{self.total_steps}; a checkpoint is in {self.checkpoint_path}. "
                f"Resume with: sage-fast distill --resume --output-dir {self.out_dir.parent}")


def _upgraded(state: dict) -> dict:
    """A checkpoint written before the synthesizer was its own component, in today's layout: its
    profile, pool and generators become the synthesizer's state, and its learning-rate schedule
    (a LambdaLR counting from step 0) moves one step ahead, as ``linear_schedule`` counts."""
    if "synthesizer" in state:
        return state
    state = dict(state)
    state["synthesizer"] = None if state["mode"] == "kd" else {
        "rounds": state["analysis_round"], "profile": state["profile"], "pool": state["pool"],
        "pool_generator": state["pool_generator"], "analysis_generator": state["analysis_generator"]}
    state["scheduler"] = {**state["scheduler"], "last_epoch": state["scheduler"]["last_epoch"] + 1}
    return state


# ------------------------------------------------------------------------------------------ driver
def default_output_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def run(config: DistillConfig, *, resume: bool = False, log=print) -> dict:
    """Train the main mode and every baseline in ``config.compare``; returns the summary that is
    also written to ``<output_dir>/results.json``.

    The run folder is locked for the whole call (``RunFolderBusy`` when another live process holds
    it), and temporaries that killed checkpoint writes left in it are removed first.

    Under ``torchrun`` every process calls this with the same config: each trains on its share of
    every step (DDP), rank 0 writes the files (lock, config, metrics, checkpoints, pictures, results)
    and logs; the others stay quiet. On one process nothing of this applies."""
    world = launched_world()
    device = rank_device(config, world)
    world = init_world(device, timeout=config.dist_timeout)
    try:
        if not world.is_main:
            log = _quiet
        out_dir = Path(config.output_dir) if config.output_dir else default_output_dir()
        out_dir = Path(world.broadcast_object(str(out_dir)))  # one folder, whatever each clock said
        config.output_dir = str(out_dir)
        modes = [config.mode, *config.compare]
        with (RunLock(out_dir, log=log) if world.is_main else contextlib.nullcontext()), _sigterm_stops():
            refusal = None
            if world.is_main:
                try:
                    _prepare_folder(config, out_dir, modes, resume, log)
                except UsageError as error:
                    refusal = error
            # a folder rank 0 refused stops every rank now, with rank 0's message
            said = world.broadcast_object(None if refusal is None else str(refusal))
            if refusal is not None:
                raise refusal
            if said is not None:
                raise DistributedError(f"rank 0 refused the run: {said}")
            return _run_modes(config, out_dir, modes, resume, log, world, device)
    finally:
        close_world(world)


def _quiet(message: str) -> None:
    """The log of ranks other than 0: rank 0 says everything once."""


def _prepare_folder(config: DistillConfig, out_dir: Path, modes: list[str], resume: bool, log) -> None:
    if not resume and any((out_dir / m / ckpt.CHECKPOINT_NAME).exists() for m in modes):
        raise DataError(f"{out_dir} already holds a run; pass --resume to continue it, or choose another "
                        "--output-dir")
    for mode in modes:
        stale = [*ckpt.remove_stale_temporaries(out_dir / mode),
                 *ckpt.remove_stale_temporaries(out_dir / mode, "metrics.jsonl")]
        if stale:
            log(f"[{mode}] removed {len(stale)} temporary file(s) of writes a killed run left unfinished")
    config.save(out_dir)


def _run_modes(config: DistillConfig, out_dir: Path, modes: list[str], resume: bool, log,
               world: World = SINGLE, device: torch.device | None = None) -> dict:
    if any(mode != "kd" for mode in modes):  # numba compiles (or loads) UMAP while the models are prepared
        warm_up_in_background()
    setup = build_setup(config, log=log, world=world, device=device)
    rows, trained = [], {}
    for mode in modes:
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
    table = results_table(summary)
    if world.is_main:
        (out_dir / RESULTS_FILE).write_text(json.dumps(summary, indent=2) + "\n")
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
        ("labelling_share", "labelling", "{:.1%}"),
    ])
