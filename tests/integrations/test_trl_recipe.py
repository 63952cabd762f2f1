"""The TRL recipe of docs/other-distillers.md, run as written there: a few steps of each trainer on
a tiny GPT-2 built from a config (no hub, no download), each starting on the loss of the TRL trainer
it stands in for."""
import math
import os
import re
import tempfile
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl import SFTConfig, SFTTrainer  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

VOCAB = 64
DOC = Path(__file__).resolve().parents[2] / "docs" / "other-distillers.md"

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def recipe():
    """The namespace of the doc's recipe block."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    (code,) = [b for b in blocks if "class DistillSFTTrainer" in b]
    namespace = {}
    exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102 - the documented code, run as written
    return namespace


@pytest.fixture(scope="module")
def tokenizer():
    words = ["[PAD]", "[EOS]"] + [f"w{i}" for i in range(VOCAB - 2)]
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[PAD]")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]")


def tiny_gpt2(layers, seed):
    torch.manual_seed(seed)
    # a wide initialisation, so that teacher and student disagree by more than rounding
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=layers, n_head=2,
                                     initializer_range=0.5, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return transformers.GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def data():
    """Prompt + answer + EOS rows of random word ids; the loss counts the answer only."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(32):
        n_prompt, n_answer = torch.randint(2, 7, (2,), generator=g).tolist()
        ids = torch.randint(2, VOCAB, (n_prompt + n_answer,), generator=g).tolist() + [1]
        rows.append({"input_ids": ids, "prompt_length": n_prompt})
    return datasets.Dataset.from_list(rows)


def collate(rows):
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        n, p = len(r["input_ids"]), r["prompt_length"]
        ids[i, :n] = torch.tensor(r["input_ids"])
        mask[i, :n] = 1
        labels[i, p:n] = ids[i, p:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# float32 throughout (TRL's configs default to bf16 autocast): "the same loss" is then checked to 1e-5,
# not to bfloat16's rounding
COMMON = dict(bf16=False, max_steps=3, per_device_train_batch_size=8, learning_rate=1e-3, logging_steps=1, report_to=[],
              use_cpu=True, disable_tqdm=True, save_strategy="no", remove_unused_columns=False,
              dataset_kwargs={"skip_prepare_dataset": True})


def train(cls, config_cls, data, tokenizer, **kwargs):
    """The logged losses of a few steps, and the trained student."""
    args = config_cls(output_dir=tempfile.mkdtemp(), **{**COMMON, **kwargs.pop("config", {})})
    trainer = cls(model=tiny_gpt2(1, seed=1), args=args, train_dataset=data, data_collator=collate,
                  processing_class=tokenizer, **kwargs)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    return losses, trainer.model


def test_gkd_recipe_starts_on_trls_loss(recipe, data, tokenizer):
    gkd = dict(config=dict(lmbda=0.0, beta=0.5))
    theirs, _ = train(GKDTrainer, GKDConfig, data, tokenizer, teacher_model=tiny_gpt2(2, seed=0), **gkd)
    on_logits, _ = train(recipe["SageGKDTrainer"], GKDConfig, data, tokenizer, teacher_model=tiny_gpt2(2, seed=0),
                         **gkd)
    fused, student = train(recipe["FusedLinearGKDTrainer"], GKDConfig, data, tokenizer,
                           teacher_model=tiny_gpt2(2, seed=0), **gkd)
    assert theirs[0] > 0.1  # the models disagree: equality below is not that of two zeros
    assert on_logits[0] == pytest.approx(theirs[0], rel=1e-5)
    assert fused[0] == pytest.approx(theirs[0], rel=1e-5)
    # training moved the student (the tied head and embedding included)
    assert not torch.equal(student.lm_head.weight, tiny_gpt2(1, seed=1).lm_head.weight)


def test_distill_sft_recipe_starts_on_sfts_loss_and_trains(recipe, data, tokenizer):
    theirs, _ = train(SFTTrainer, SFTConfig, data, tokenizer)
    cross_entropy_only, _ = train(recipe["DistillSFTTrainer"], SFTConfig, data, tokenizer,
                                  teacher_model=tiny_gpt2(2, seed=0), alpha=0.0)
    assert cross_entropy_only[0] == pytest.approx(theirs[0], rel=1e-5)
    # distillation proper, under TRL's default bfloat16 autocast: the heads' GEMMs in bfloat16
    distilled, _ = train(recipe["DistillSFTTrainer"], SFTConfig, data, tokenizer, teacher_model=tiny_gpt2(2, seed=0),
                         alpha=0.5, temperature=2.0, config=dict(bf16=True))
    assert distilled[0] != pytest.approx(theirs[0], rel=1e-3)
