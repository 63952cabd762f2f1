"""Hugging Face classifiers behind one vector interface.

Token ids become vectors once, through the teacher's frozen word-embedding table: ``x = E_t[ids]``
(``[n, L, d_t]``). Both models take ``inputs_embeds``: the teacher ``x`` directly, the student
``A(x)`` through an adapter ``A: R^{d_t} -> R^{d_s}`` (identity when the sizes match, a learned
``nn.Linear`` otherwise). ``inputs_embeds`` replaces only the word-embedding lookup: position and
token-type embeddings and the embedding LayerNorm are still applied inside each model.

Position ids: BERT and DistilBERT number positions 0..L-1 either way. RoBERTa-style models (RoBERTa,
MPNet, ...) number them from the input ids (``padding_idx + cumsum(ids != pad)``, pads get
``padding_idx``) but, given embeddings, as ``padding_idx + 1 .. padding_idx + L`` for every token.
The interface therefore passes ``position_ids = padding_idx + cumsum(mask) * mask`` to those models,
so ``model(inputs_embeds=E[ids])`` equals ``model(input_ids=ids)`` (the mask being the tokenizer's).

Export folds a linear adapter into an ordinary ``d_s`` table over the teacher's vocabulary,
``E_s' = E_t A^T + b``, so the student becomes a standard model used with the teacher's tokenizer.
"""
from __future__ import annotations

import copy
import inspect
import json
import pickle
import sys
from pathlib import Path

import torch
from torch import nn

from ..nn.positions import padding_offset, position_ids
from . import ModelError, require_transformers

try:
    from safetensors import SafetensorError
except ImportError:  # safetensors comes with transformers; without either nothing here loads weights
    SafetensorError = None

SHORT_NAMES = ("minilm", "mpnet")


def resolve_model_path(name_or_path: str) -> str:
    """``minilm`` / ``mpnet`` name the packaged offline models; anything else is a folder or hub id.
    A local folder's ``config.json``, when it has one, must be readable (else a ModelError)."""
    from .. import assets

    if name_or_path == "minilm":
        try:
            return str(assets.minilm_path())
        except assets.AssetError as err:
            raise ModelError(str(err)) from None
    if name_or_path == "mpnet":
        path = assets.mpnet_path()
        if not (path / "config.json").is_file():
            raise ModelError(f"the MPNet model is not in {path}; run `sage-fast assets --mpnet` to install it")
        return str(path)
    if Path(name_or_path).is_dir():
        read_model_config(name_or_path)
    return str(name_or_path)


def read_model_config(folder) -> dict | None:
    """The ``config.json`` of a local model folder as a dict, None when there is none; a ModelError
    when it is not a JSON object (an interrupted copy, an empty file)."""
    path = Path(folder) / "config.json" if Path(folder).is_dir() else Path(folder)
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        reason = "it is empty" if path.stat().st_size == 0 else f"{type(err).__name__}: {err}"
        raise ModelError(f"{path} is not a readable model config ({reason}); the folder may be damaged or partly "
                         "copied: copy or save the model again") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path} must hold a JSON object (a model config), got a {type(config).__name__}")
    # The entries read before transformers is asked to build the model: wrong types here would
    # fail later as a TypeError far from the file that holds them.
    expected = {"num_labels": "a positive integer", "vocab_size": "a positive integer",
                "max_position_embeddings": "a positive integer", "id2label": "an object", "architectures": "a list"}
    for key, kind in expected.items():
        value = config.get(key)
        ok = (value is None or (isinstance(value, dict) if kind == "an object" else isinstance(value, list)
                                if kind == "a list" else (isinstance(value, int) and not isinstance(value, bool)
                                                          and value >= 1)))
        if not ok:
            raise ModelError(f"{path} has {key} {value!r}; expected {kind}. The config may have been edited by hand "
                             "or come from another program: save the model again")
    return config


def saved_label_count(name_or_path: str) -> int | None:
    """The label count a saved classifier was trained with, or None when it has no task head (or is
    not a local folder)."""
    path = resolve_model_path(name_or_path)
    config = read_model_config(path) if Path(path).is_dir() else None
    if config is None or not any("ForSequenceClassification" in str(a) for a in config.get("architectures") or []):
        return None
    if isinstance(config.get("id2label"), dict):
        return len(config["id2label"])
    # Recent transformers leave the label count out of config.json when it is the default (2).
    count = config.get("num_labels", 2)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ModelError(f"{name_or_path}/config.json has num_labels {count!r}; expected a positive integer")
    return count


# The files a tokenizer's vocabulary comes from, one of which a local folder must hold: without
# them transformers builds a tokenizer of special tokens only, and every word becomes [UNK].
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
                    "sentencepiece.bpe.model", "tokenizer.model", "sentencepiece.model", "source.spm")
# Models that number positions from the padding index (see the module docstring): their first
# ``pad_token_id + 1`` position embeddings are never used by a token.
POSITIONS_FROM_PADDING = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "mpnet", "longformer",
                          "data2vec-text", "ibert", "roberta-prelayernorm")
# Weight files that fail to parse raise these (safetensors, and torch.load for .bin files).
_WEIGHT_ERRORS = (EOFError, RuntimeError, pickle.UnpicklingError) + ((SafetensorError,) if SafetensorError else ())


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load(loader, name_or_path: str, what: str, **kwargs):
    path = resolve_model_path(name_or_path)
    local = Path(path).is_dir()
    looks_local = local or path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not local:
        raise ModelError(f"no {what} folder at {path}; pass an existing folder, a Hugging Face model id, "
                         "or `minilm` (run `sage-fast assets` to install the offline models)")
    try:
        return loader(path, local_files_only=True, **kwargs) if local else loader(path, **kwargs)
    except (OSError, ValueError) as err:
        where = f"the folder {path}" if local else f"the Hugging Face cache and hub for {path!r}"
        raise ModelError(f"cannot load a {what} from {where} ({_first_line(err)}). Offline, use a local folder or "
                         "`minilm`; run `sage-fast assets` to install the packaged models") from None
    except _WEIGHT_ERRORS as err:
        raise ModelError(f"cannot load the weights of the {what} in {path} ({type(err).__name__}: "
                         f"{_first_line(err)[:200]}); the weight file may be damaged, partly copied or of another "
                         "architecture: copy or save the model again") from None


def load_classifier(name_or_path: str, num_labels: int):
    """A sequence classifier with ``num_labels`` outputs. A checkpoint without a task head (or with
    a head of another size) gets a freshly initialised head. Local folders never touch the network."""
    transformers = require_transformers()
    if int(num_labels) < 1:
        raise ModelError(f"num_labels must be at least 1, got {num_labels}")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the "newly initialized head" warning is expected here
    try:
        model, info = _load(transformers.AutoModelForSequenceClassification.from_pretrained, name_or_path, "model",
                            num_labels=int(num_labels), ignore_mismatched_sizes=True, output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    # ignore_mismatched_sizes lets a head of another size (or none) be made afresh; anything else
    # made afresh means the weights do not belong to this config, and the model would be random.
    prefix = f"{model.base_model_prefix}."
    body = sorted(key for key in [*info.get("missing_keys", ()), *(k[0] for k in info.get("mismatched_keys", ()))]
                  if key.startswith(prefix) and not key.startswith(f"{prefix}pooler."))
    if body:
        named = ", ".join(body[:3]) + (", ..." if len(body) > 3 else "")
        raise ModelError(f"the weights in {resolve_model_path(name_or_path)} do not fit its config.json: {len(body)} "
                         f"weight(s) are missing or of another shape ({named}); the folder mixes files of two models: "
                         "copy or save the model again")
    return model


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model folder or hub id; a local folder without vocabulary files is refused."""
    transformers = require_transformers()
    path = Path(resolve_model_path(name_or_path))
    if path.is_dir() and not any((path / name).is_file() for name in VOCABULARY_FILES):
        present = sorted(p.name for p in path.iterdir())
        raise ModelError(f"{path} holds no tokenizer: none of {', '.join(VOCABULARY_FILES)} is there (it has "
                         f"{', '.join(present[:12]) or 'nothing'}). Save the tokenizer of the model it came from "
                         "beside it (tokenizer.save_pretrained(folder))")
    tokenizer = _load(transformers.AutoTokenizer.from_pretrained, name_or_path, "tokenizer")
    if tokenizer.vocab_size <= len(tokenizer.all_special_tokens):
        raise ModelError(f"the tokenizer of {name_or_path} knows only its {tokenizer.vocab_size} special tokens, so "
                         "every word would be unknown; its vocabulary file is missing or empty")
    config = read_model_config(path) if path.is_dir() else None
    if config:
        # The tokenizer beside a model must fit it: a larger vocabulary would index past the model's
        # word embeddings, longer inputs past its position embeddings.
        rows = config.get("vocab_size")
        if rows is not None and len(tokenizer) > rows:
            raise ModelError(f"the tokenizer in {path} has {len(tokenizer)} tokens but the model there has {rows} "
                             "word embeddings: the tokenizer belongs to another model; save the model's own beside it")
        positions = config.get("max_position_embeddings")
        if positions is not None:
            if config.get("model_type") in POSITIONS_FROM_PADDING:
                positions -= int(config.get("pad_token_id") or 0) + 1
            tokenizer.model_max_length = min(tokenizer.model_max_length, positions)
    return tokenizer


def encoder_layers(model) -> tuple[nn.Module, str, nn.ModuleList]:
    """The list of transformer blocks, found generically: the longest ``nn.ModuleList`` inside the
    base model whose length is the configured layer count (``encoder.layer`` for BERT/RoBERTa/MPNet,
    ``transformer.layer`` for DistilBERT). Returns (parent module, attribute name, list)."""
    config = model.config
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", None)
    best = None
    for parent_name, parent in model.base_model.named_modules():
        for attr, child in parent.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == count and (best is None or parent_name.count(".") < best[3]):
                best = (parent, attr, child, parent_name.count("."))
    if best is None:
        raise ModelError(f"cannot find the {count} transformer layers of {type(model).__name__}")
    return best[0], best[1], best[2]


def _set_layer_count(config, count: int) -> None:
    for key in ("num_hidden_layers", "n_layers"):
        if hasattr(config, key):
            setattr(config, key, count)


def student_from_teacher(teacher, *, every_k: int = 2, layers: list[int] | None = None):
    """A shallower copy of ``teacher`` (DistilBERT-style): the same embeddings, head and every
    ``every_k``-th encoder layer starting at layer 0 (or exactly ``layers``). The teacher is not
    modified. The chosen teacher layers are recorded as ``config.sage_fast_teacher_layers``."""
    _, _, teacher_layers = encoder_layers(teacher)
    total = len(teacher_layers)
    if layers is None:
        if int(every_k) < 1:
            raise ModelError(f"every_k must be at least 1, got {every_k}")
        layers = list(range(0, total, int(every_k)))
    layers = [int(i) for i in layers]
    if not layers or any(not 0 <= i < total for i in layers) or len(set(layers)) != len(layers):
        raise ModelError(f"layers must be distinct indices in [0, {total}), got {layers}")
    student = copy.deepcopy(teacher)
    parent, attr, student_layers = encoder_layers(student)
    setattr(parent, attr, nn.ModuleList([student_layers[i] for i in layers]))
    for new_index, layer in enumerate(getattr(parent, attr)):
        for module in layer.modules():  # keep per-layer indices (used by some attention caches) consistent
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    _set_layer_count(student.config, len(layers))
    student.config.sage_fast_teacher_layers = layers
    student.requires_grad_(True)
    return student


def student_from_config(config_or_name, num_labels: int, **overrides):
    """A freshly initialised classifier from a config object or a model's config (by name or folder),
    with ``overrides`` such as ``num_hidden_layers=4, hidden_size=256``."""
    transformers = require_transformers()
    if isinstance(config_or_name, transformers.PretrainedConfig):
        config = copy.deepcopy(config_or_name)
    elif Path(str(config_or_name)).is_file():  # a config.json of any name
        values = read_model_config(config_or_name)
        if "model_type" not in values:
            raise ModelError(f"{config_or_name} has no model_type, so it is not a Hugging Face model config "
                             "(write one with config.save_pretrained(folder) or config.to_json_file(path))")
        try:
            config = transformers.AutoConfig.for_model(**values)
        except (ValueError, TypeError, KeyError) as err:
            raise ModelError(f"{config_or_name} is not a usable model config ({_first_line(err)})") from None
    else:
        config = _load(transformers.AutoConfig.from_pretrained, config_or_name, "config")
    for key, value in overrides.items():
        setattr(config, key, value)
    config.num_labels = int(num_labels)
    return transformers.AutoModelForSequenceClassification.from_config(config)


def _setting(config, *names):
    for name in names:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if value is not None:
            return value
    return None


def check_student_config(config, what: str, max_length: int) -> None:
    """A ModelError when the driver cannot train a student of this config (a dict as in config.json,
    or a PretrainedConfig): attention heads that do not divide its width, fewer positions than
    ``max_length`` tokens, or no padding token (batches are padded; a classifier that pools the last
    token, as GPT-2's does, cannot tell where a padded row ends without one)."""
    width = _setting(config, "hidden_size", "n_embd", "dim", "d_model")
    heads = _setting(config, "num_attention_heads", "n_head", "n_heads")
    if isinstance(width, int) and isinstance(heads, int) and heads > 0 and width % heads:
        raise ModelError(f"the student {what} has hidden size {width}, which its {heads} attention heads do not "
                         f"divide: each head takes an equal share of the width. Give it a hidden size that is a "
                         f"multiple of {heads}, or a head count that divides {width}")
    positions = _setting(config, "max_position_embeddings", "n_positions")
    if isinstance(positions, int) and not isinstance(positions, bool):
        if _setting(config, "model_type") in POSITIONS_FROM_PADDING:
            positions -= int(_setting(config, "pad_token_id") or 0) + 1
        if positions < max_length:
            raise ModelError(f"the student {what} has {positions} position embeddings, fewer than --max-length "
                             f"{max_length} tokens: use --max-length {positions} or less, or a student with more "
                             "positions")
    if _setting(config, "pad_token_id") is None:
        raise ModelError(f"the student {what} has no padding token (pad_token_id is unset in its config): the "
                         "driver pads its batches, and a classifier that reads the last token (GPT-2 and other "
                         "decoders) cannot find where a padded row ends. Set pad_token_id in its config.json (for "
                         "GPT-2, its eos_token_id), or use an encoder student")


def check_student_spec(spec: str, max_length: int) -> None:
    """The checks of ``check_student_config`` on a student given as a config file or a local folder,
    from its config alone, before any data or model is loaded; students made from the teacher or
    named by hub id are checked once built."""
    if spec.startswith("from-teacher"):
        return
    path = Path(spec)
    if not (path.is_file() or (path.is_dir() and (path / "config.json").is_file())):
        return
    values = read_model_config(path)
    if not values or "model_type" not in values:
        return  # not a model config: said where the student is built
    try:  # the model type's defaults fill what the file leaves out (a BERT config without pad_token_id pads with 0)
        config = require_transformers().AutoConfig.for_model(**values)
    except (ValueError, TypeError, KeyError):
        return
    check_student_config(config, spec, max_length)


def student_from_pretrained(name_or_path: str, num_labels: int):
    return load_classifier(name_or_path, num_labels)


def _takes_token_types(model) -> bool:
    accepts = "token_type_ids" in inspect.signature(model.forward).parameters
    return accepts and getattr(model.config, "type_vocab_size", 0) > 1


def _full_mask(model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor):
    """The attention mask to give ``model``: on CUDA the 4-D mask of ``full_attention_mask``, so no
    forward waits for the device; elsewhere the 2-D mask (on the CPU the check costs nothing)."""
    if not attention_mask.is_cuda:
        return attention_mask
    return full_attention_mask(model, inputs_embeds, attention_mask)


def full_attention_mask(model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor):
    """The 4-D attention mask ``model`` would build from the 2-D ``attention_mask``, built without
    its check for "no padding at all" (``padding_mask.all()`` in transformers' mask utilities, a
    host read: on CUDA every forward would wait for the device). Models whose code builds masks
    with transformers' ``create_bidirectional_mask`` take a 4-D mask as it is; for others (and
    decoders, and a transformers without that function) the 2-D mask unchanged."""
    if getattr(model.config, "is_decoder", False):
        return attention_mask
    base = getattr(model, "base_model", model)
    build = getattr(sys.modules.get(type(base).__module__), "create_bidirectional_mask", None)
    if build is None:
        return attention_mask
    # The model builds its mask for its embedding output, in the parameters' dtype: the same here
    # (shape, dtype and device are all the builder reads of it).
    like = inputs_embeds.new_empty(()).to(model.dtype).expand(inputs_embeds.shape)
    try:
        return build(config=model.config, inputs_embeds=like, attention_mask=attention_mask,
                     allow_is_bidirectional_skip=False)
    except TypeError:  # a transformers without that switch: the model's own mask, with the check
        return attention_mask


class VectorInterface(nn.Module):
    """Teacher and student fed through one vector space (see the module docstring).

    The teacher is frozen (``requires_grad`` off, eval mode); its word-embedding table is shared,
    not copied. ``adapter_init="lstsq"`` starts a linear adapter at the least-squares map from the
    teacher's table to the student's own, for students that share the teacher's vocabulary.
    """

    def __init__(self, teacher, student, *, adapter_init: str = "random"):
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student
        teacher_table = teacher.get_input_embeddings()
        student_table = student.get_input_embeddings()
        self.teacher_dim = teacher_table.embedding_dim
        self.student_dim = student_table.embedding_dim
        if self.teacher_dim == self.student_dim:
            self.adapter = nn.Identity()
        else:
            self.adapter = nn.Linear(self.teacher_dim, self.student_dim)
            if adapter_init == "lstsq":
                self._fit_adapter(teacher_table.weight, student_table.weight)
            elif adapter_init != "random":
                raise ModelError(f"adapter_init must be 'random' or 'lstsq', got {adapter_init!r}")
        self._teacher_offset = padding_offset(teacher)
        self._student_offset = padding_offset(student)
        self._teacher_token_types = _takes_token_types(teacher)
        self._student_token_types = _takes_token_types(student)

    @torch.no_grad()
    def _fit_adapter(self, teacher_weight: torch.Tensor, student_weight: torch.Tensor) -> None:
        if teacher_weight.shape[0] != student_weight.shape[0]:
            raise ModelError("adapter_init='lstsq' needs teacher and student vocabularies of the same size, got "
                             f"{teacher_weight.shape[0]} and {student_weight.shape[0]}")
        design = torch.cat([teacher_weight.double(), torch.ones_like(teacher_weight[:, :1]).double()], dim=1)
        solution = torch.linalg.lstsq(design, student_weight.double()).solution  # [d_t + 1, d_s]
        self.adapter.weight.copy_(solution[:-1].T)
        self.adapter.bias.copy_(solution[-1])

    @property
    def teacher_embeddings(self) -> nn.Embedding:
        return self.teacher.get_input_embeddings()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``x = E_t[ids]``: ``[n, L]`` token ids -> ``[n, L, d_t]`` vectors (no gradient to ``E_t``)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int32):
            raise ValueError(f"input_ids must be an integer torch.Tensor, got {getattr(input_ids, 'dtype', type(input_ids))}")
        with torch.no_grad():
            return self.teacher_embeddings(input_ids)

    def trainable_parameters(self):
        """The student's and the adapter's parameters (what the optimizer updates)."""
        return [p for p in list(self.student.parameters()) + list(self.adapter.parameters()) if p.requires_grad]

    def train(self, mode: bool = True):
        # The teacher never trains (no dropout in its labels), and is never switched even for a
        # moment: a round's worker thread may be labelling with it while the student switches modes.
        self.training = mode
        self.student.train(mode)
        self.adapter.train(mode)
        return self

    @staticmethod
    def _check(x: torch.Tensor, attention_mask: torch.Tensor, dim: int, who: str) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != dim:
            raise ValueError(f"x must be a [n, L, {dim}] tensor for the {who}, got {tuple(getattr(x, 'shape', ()))}")
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"attention_mask must have shape {tuple(x.shape[:2])}, got "
                             f"{tuple(getattr(attention_mask, 'shape', ()))}")

    @staticmethod
    def _forward(model, inputs_embeds, attention_mask, offset, takes_token_types, token_type_ids,
                 output_hidden_states):
        kwargs = {}
        if offset is not None:
            kwargs["position_ids"] = position_ids(attention_mask, offset)
        if token_type_ids is not None and takes_token_types:
            kwargs["token_type_ids"] = token_type_ids
        return model(inputs_embeds=inputs_embeds, attention_mask=_full_mask(model, inputs_embeds, attention_mask),
                     output_hidden_states=output_hidden_states, return_dict=True, **kwargs)

    def teacher_forward(self, x, attention_mask, output_hidden_states: bool = False, token_type_ids=None):
        self._check(x, attention_mask, self.teacher_dim, "teacher")
        return self._forward(self.teacher, x, attention_mask, self._teacher_offset, self._teacher_token_types,
                             token_type_ids, output_hidden_states)

    def student_forward(self, x, attention_mask, output_hidden_states: bool = False, token_type_ids=None):
        self._check(x, attention_mask, self.teacher_dim, "student")
        return self._forward(self.student, self.adapter(x), attention_mask, self._student_offset,
                             self._student_token_types, token_type_ids, output_hidden_states)

    @torch.no_grad()
    def folded_student_table(self) -> torch.Tensor:
        """``E_t A^T + b`` (or ``E_t`` for an identity adapter): the student's table over the teacher's vocabulary."""
        table = self.teacher_embeddings.weight
        if not isinstance(self.adapter, nn.Linear):
            return table.clone()
        # fold in fp32 whatever the training dtype, so the exported table is as exact as it can be
        weight, bias = self.adapter.weight.float(), self.adapter.bias.float()
        return torch.nn.functional.linear(table.float(), weight, bias)


def export_student(interface: VectorInterface, tokenizer, out_dir, student=None) -> Path:
    """Save the student as a standard Hugging Face model over the teacher's vocabulary.

    A copy of the student gets the folded table ``E_t A^T + b`` as its word embeddings; it is saved
    with ``save_pretrained`` beside the teacher's tokenizer, so ``AutoModelForSequenceClassification``
    and ``AutoTokenizer`` load it from ``out_dir`` and give, from text, the logits seen in training.
    The student's own position numbering (its ``pad_token_id``) is kept.
    """
    student = interface.student if student is None else student
    exported = copy.deepcopy(student).cpu()
    table = interface.folded_student_table().detach().cpu()
    exported.set_input_embeddings(nn.Embedding.from_pretrained(table.to(exported.dtype), freeze=False))
    exported.config.vocab_size = table.shape[0]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    exported.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


INTERFACE_FILE = "sage_fast_interface.json"


def save_interface(interface: VectorInterface, folder, *, teacher_path=None, tokenizer=None) -> Path:
    """Save what export needs: the student, the adapter, where the teacher is, and the tokenizer.

    With ``teacher_path`` (a folder the teacher was loaded from, e.g. a cached fine-tuned teacher)
    only the path is recorded; otherwise the teacher is saved in ``folder/teacher``. Without
    ``tokenizer`` the teacher's folder must hold one.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    interface.student.save_pretrained(folder / "student")
    linear = isinstance(interface.adapter, nn.Linear)
    if linear:
        torch.save(interface.adapter.state_dict(), folder / "adapter.pt")
    if teacher_path is None:
        interface.teacher.save_pretrained(folder / "teacher")
        teacher_entry = "teacher"
    else:
        teacher_entry = str(Path(resolve_model_path(str(teacher_path))).resolve())
    if tokenizer is not None:
        tokenizer.save_pretrained(folder / "tokenizer")
    record = {"format": 1, "teacher": teacher_entry, "adapter": "linear" if linear else "identity",
              "teacher_dim": interface.teacher_dim, "student_dim": interface.student_dim,
              "tokenizer": "tokenizer" if tokenizer is not None else teacher_entry}
    (folder / INTERFACE_FILE).write_text(json.dumps(record, indent=1))
    return folder


def read_interface_record(folder) -> dict:
    """The ``sage_fast_interface.json`` of a trained folder, checked: a ModelError says what is wrong."""
    record_file = Path(folder) / INTERFACE_FILE
    if not record_file.is_file():
        raise ModelError(f"{folder} is not a saved training checkpoint (it has no {INTERFACE_FILE})")
    damaged = (f"{record_file} is damaged ({{}}); it is written at the end of training by sage-fast distill: "
               "train again, or use another run's trained folder")
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ModelError(damaged.format(f"{type(err).__name__}: {err}")) from None
    if not isinstance(record, dict):
        raise ModelError(damaged.format(f"a JSON {type(record).__name__}, not an object"))
    expected = {"teacher": str, "tokenizer": str, "adapter": str}
    wrong = [key for key, kind in expected.items() if not isinstance(record.get(key), kind)]
    if wrong:
        raise ModelError(damaged.format(f"no text entry for {', '.join(wrong)}"))
    if record["adapter"] not in ("linear", "identity"):
        raise ModelError(damaged.format(f"adapter {record['adapter']!r} is neither 'linear' nor 'identity'"))
    return record


def load_interface(folder, device="cpu"):
    """(interface, tokenizer) from a folder written by ``save_interface``."""
    transformers = require_transformers()
    folder = Path(folder)
    record = read_interface_record(folder)

    def inside(entry: str) -> str:
        return str(folder / entry) if not Path(entry).is_absolute() else entry

    classifier = transformers.AutoModelForSequenceClassification.from_pretrained
    teacher = _load(classifier, inside(record["teacher"]), "teacher model")
    student = _load(classifier, str(folder / "student"), "student model")
    tokenizer = _load(transformers.AutoTokenizer.from_pretrained, inside(record["tokenizer"]), "tokenizer")
    interface = VectorInterface(teacher, student)
    if record["adapter"] == "linear":
        if not isinstance(interface.adapter, nn.Linear):
            raise ModelError(f"{folder} records a linear adapter but its models have equal widths")
        try:
            interface.adapter.load_state_dict(torch.load(folder / "adapter.pt", map_location="cpu", weights_only=True))
        except (OSError, *_WEIGHT_ERRORS) as err:
            raise ModelError(f"cannot load {folder / 'adapter.pt'} ({type(err).__name__}: {_first_line(err)[:200]}); "
                             "it may be damaged: train again, or use another run's trained folder") from None
    return interface.to(device), tokenizer


__all__ = ["INTERFACE_FILE", "VOCABULARY_FILES", "VectorInterface", "read_model_config", "saved_label_count", "load_interface", "save_interface", "encoder_layers", "export_student", "load_classifier", "load_tokenizer",
           "resolve_model_path", "student_from_config", "student_from_pretrained", "student_from_teacher"]
