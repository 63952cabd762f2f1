"""Which of the teacher's classes is which of the data's labels.

A teacher predicts classes by index, and the data numbers its labels by its own rule (a CSV's label
set sorted, a built-in task's fixed order). The two orders agree only by luck: a teacher fine-tuned
on the built-in Rotten Tomatoes task (``rotten`` 0, ``fresh`` 1) read by index on a CSV whose labels
sort ``fresh`` first would score below chance, and the student would learn the labels swapped.
So when both sides name their classes, classes are matched by name (the data is renumbered in the
teacher's order) and names that disagree are refused; only when a side has no names (the generic
``LABEL_0``.., or class numbers ``0..C-1``) are they matched by index, and the log says which rule
was used.
"""
from __future__ import annotations

import re

from . import ModelError
from .data import TaskData

_GENERIC = re.compile(r"LABEL_(\d+)")


def model_label_names(model_config) -> list[str] | None:
    """The class names of a model config in class order, or None when it has none to match by."""
    id2label = getattr(model_config, "id2label", None)
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        names = [str(id2label[i] if i in id2label else id2label[str(i)]) for i in range(len(id2label))]
    except KeyError:
        return None
    return None if _generic(names) else names


def _generic(names: list[str]) -> bool:
    """Names that only number the classes: ``LABEL_i`` (transformers' default) or ``i`` itself."""
    for index, name in enumerate(names):
        match = _GENERIC.fullmatch(name.strip())
        if not ((match and int(match.group(1)) == index) or name.strip() == str(index)):
            return False
    return True


def _key(name: str) -> str:
    return name.strip().casefold()


def match_by_name(teacher_names: list[str] | None, data_names: list[str], teacher: str) -> list[int] | None:
    """For each data label, the teacher's class of the same name; None when either side has no
    names (then classes are matched by index); a ModelError when the names disagree."""
    if teacher_names is None or _generic(list(data_names)):
        return None
    where = {_key(name): i for i, name in enumerate(teacher_names)}
    if len(where) != len(teacher_names) or set(where) != {_key(name) for name in data_names}:
        raise ModelError(f"the teacher {teacher} predicts the classes {teacher_names} but the data's labels are "
                         f"{list(data_names)}: their names disagree, so no class of the teacher is known to mean "
                         "any label of the data. Use a teacher fine-tuned on labels of these names (leave --teacher "
                         "unset to fine-tune one), or rename the labels in the data to the teacher's")
    return [where[_key(name)] for name in data_names]


def align_to_teacher(data: TaskData, teacher_config, teacher: str, log=print) -> TaskData:
    """``data`` numbered in the teacher's class order (matched by name when both sides have names);
    the log says which rule matched them."""
    order = match_by_name(model_label_names(teacher_config), data.label_names, teacher)
    if order is None:
        pairs = ", ".join(f"{i}={name}" for i, name in enumerate(data.label_names))
        log(f"labels: the teacher's classes are matched to the data's by index ({pairs}), since "
            f"{'the data' if model_label_names(teacher_config) is not None else 'the teacher'} names its classes "
            "only by number")
        return data
    aligned = data.renumbered(order)
    if order == list(range(len(order))):
        log(f"labels: the teacher's classes match the data's by name, in the same order ({aligned.label_names})")
    else:
        moved = ", ".join(f"{name}: {i} -> {order[i]}" for i, name in enumerate(data.label_names))
        log(f"labels: the teacher's classes are matched to the data's by name, so the data is renumbered in the "
            f"teacher's order ({moved})")
    return aligned


def below_chance(accuracy: float | None, num_labels: int, split: str, who: str) -> str | None:
    """A warning when ``accuracy`` is below chance (one over the class count), else None."""
    if accuracy is None or accuracy >= 1.0 / num_labels:
        return None
    return (f"{who} scores {accuracy:.4f} on {split}, below chance ({1.0 / num_labels:.4f} for {num_labels} "
            "classes): its classes may mean other labels than the data's, or it did not learn the task")


def teacher_warnings(teacher_metrics: dict, data: TaskData, teacher: str, log=print,
                     outputs: dict | None = None) -> list[str]:
    """The warnings the teacher's own scores call for (logged, and returned for the results): below
    chance on validation, or one class for every validation row (``outputs``: its cached outputs)."""
    import torch

    from .metrics import one_class_warning

    found = [below_chance(teacher_metrics.get("validation_accuracy_vector"), data.num_labels, "validation",
                          f"the teacher {teacher}")]
    if outputs is not None and "validation" in outputs:
        predicted = outputs["validation"]["logits"].argmax(-1)
        found.append(one_class_warning(torch.bincount(predicted, minlength=data.num_labels), data.label_names,
                                       "validation", f"the teacher {teacher}"))
    found = [warning for warning in found if warning]
    for warning in found:
        log(f"warning: {warning}")
    return found


def name_classes(model_config, label_names: list[str]) -> None:
    """Give a model's classes the data's names, so a saved or exported student says what it predicts."""
    model_config.id2label = dict(enumerate(label_names))
    model_config.label2id = {name: i for i, name in enumerate(label_names)}


__all__ = ["align_to_teacher", "below_chance", "match_by_name", "model_label_names", "name_classes",
           "teacher_warnings"]
