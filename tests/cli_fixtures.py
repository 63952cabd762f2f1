"""Tiny models and data files shared by the command-line tests (fast on two CPU cores)."""
import csv
import random

import torch

# One sentiment word decides the label; the filler words carry nothing. A model that learns reaches
# (nearly) 100% test accuracy, one that does not stays near 50%: the two labels alternate.
POSITIVE = ["good", "great", "fun", "superb"]
NEGATIVE = ["bad", "awful", "dull", "boring"]
FILLER = ["the", "movie", "plot", "was", "a", "film"]


def write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def make_teacher(folder, num_labels):
    """A 2-layer BERT classifier with random weights and the real MiniLM tokenizer, saved in ``folder``."""
    import transformers

    from sage_fast.assets import minilm_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                     num_labels=num_labels)
    model = transformers.BertForSequenceClassification(config)
    model.config.architectures = ["BertForSequenceClassification"]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_data(path, n=120, seed=1):
    """``n`` rows of a few filler words and one sentiment word that decides the label (1 or 0)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append((" ".join(words), label))
    return write_csv(path, rows)


def distill_args(root, out):
    """A distill command on the tiny teacher and data in ``root`` that trains in seconds."""
    return ["distill", "--teacher", str(root / "teacher"), "--student", "from-teacher:2",
            "--train-file", str(root / "data.csv"), "--epochs", "1", "--batch-size", "16", "--max-length", "12",
            "--synthetic-per-round", "16", "--synthetic-per-batch", "4", "--pool-size", "32", "--n-neighbors", "5",
            "--device", "cpu", "--no-progress", "--output-dir", str(out), "--cache-dir", str(root / "cache")]
