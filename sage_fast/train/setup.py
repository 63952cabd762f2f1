"""What every mode of one distillation shares, built once: the data, the teacher (fine-tuned here
when none is given), the tokenizer, the teacher's cached outputs, the student it starts from, and
the settings derived from the config for the loss, the synthesizer and the session."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..assets import cache_root
from ..devices import resolve_device
from ..distributed import SINGLE, DistributedError, World
from ..nn import SAGELoss, SAGELossConfig
from ..synthesis import SessionSettings, SynthesisConfig
from . import ModelError
from . import label_identity, teacher_cache
from .config import DistillConfig
from .data import encode, load_task
from .models import (VectorInterface, check_student_config, check_student_spec, load_classifier, load_tokenizer,
                     saved_label_count, student_from_config, student_from_teacher)
from .teacher import TeacherSettings, fine_tune_teacher, read_teacher_metrics

DEFAULT_TEACHER_BASE = "minilm"


def default_cache_dir() -> Path:
    return cache_root() / "teacher_outputs"



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
    warnings: list = field(default_factory=list)  # said in the log and again under the results table


def _check_teacher_labels(teacher, num_labels: int, name: str) -> None:
    if int(teacher.config.num_labels) != num_labels:
        raise ModelError(f"the teacher {name} has {teacher.config.num_labels} labels but the task has {num_labels}; "
                         "use a teacher fine-tuned on this task, or leave --teacher unset to fine-tune one")


def build_setup(config: DistillConfig, log=print, *, world: World = SINGLE, device: torch.device | None = None) -> Setup:
    """Data, teacher, tokenizer and the teacher's cached outputs. Under several processes rank 0
    fine-tunes the teacher and fills the caches first; the others then read them."""
    device = resolve_device(config.device) if device is None else device
    check_student_spec(config.student, config.max_length)  # before the data and the teacher
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
    data = label_identity.align_to_teacher(data, teacher.config, teacher_name, log)
    tokenizer = load_tokenizer(teacher_name)
    encoded = {name: encode(split, tokenizer, config.max_length) for name, split in data.splits().items()}

    torch.manual_seed(config.seed)
    student = build_student(config.student, teacher, data.num_labels).to(device)
    label_identity.name_classes(student.config, data.label_names)
    check_student_config(student.config, config.student, config.max_length)
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
                                                              device, config.progress, f"teacher outputs ({name})"),
                teacher=teacher_name, split=name)
            if hit:
                log(f"teacher outputs for {name} from the cache ({cache_dir})")
    for name in ("validation", "test"):
        predicted = outputs[name]["logits"].argmax(-1)
        teacher_metrics[f"{name}_accuracy_vector"] = float((predicted == encoded[name]["labels"]).float().mean())
    warnings = label_identity.teacher_warnings(teacher_metrics, data, teacher_name, log, outputs)
    return Setup(config, device, data, tokenizer, teacher, teacher_name, encoded, outputs, teacher_layers,
                 student, layer_map, teacher_metrics, world, warnings)


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


def synthesis_config(config: DistillConfig, mode: str, device: torch.device, *, num_examples: int | None = None,
                     steps_per_epoch: int | None = None, interval: int | None = None) -> SynthesisConfig:
    """The synthesizer's settings for ``mode`` (``sage`` or ``random``) from the driver's config."""
    return config.synthesis_settings(mode, device, num_examples=num_examples, steps_per_epoch=steps_per_epoch,
                                     interval=interval)



def session_settings(config: DistillConfig) -> SessionSettings:
    """How the driver drives the synthesizer, from its config."""
    return SessionSettings(synthetic_per_batch=config.synthetic_per_batch, analysis_every=config.analysis_every,
                           analysis_lag=config.analysis_lag, profile_signal=config.profile_signal,
                           refresh_profile=config.refresh_profile, temperature=config.temperature)


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

