"""`sage-fast distill` and `sage-fast analyze` end to end on tiny models, and their answers to bad input."""
import csv
import json
import random
import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("umap")

from sage_fast.cli import main  # noqa: E402


def write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def make_teacher(folder, num_labels):
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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_cli")
    make_teacher(root / "teacher", 2)
    rng = random.Random(1)
    words = ["good", "bad", "movie", "plot", "the", "great", "awful", "was"]
    rows = [(" ".join(rng.choice(words) for _ in range(rng.randint(2, 7))), i % 2) for i in range(120)]
    write_csv(root / "data.csv", rows)
    return root


def base_args(tiny, out):
    return ["distill", "--teacher", str(tiny / "teacher"), "--student", "from-teacher:2",
            "--train-file", str(tiny / "data.csv"), "--epochs", "1", "--batch-size", "16", "--max-length", "12",
            "--synthetic-per-round", "16", "--synthetic-per-batch", "4", "--pool-size", "32", "--n-neighbors", "5",
            "--device", "cpu", "--no-progress", "--output-dir", str(out), "--cache-dir", str(tiny / "cache")]


def test_distill_in_every_mode_then_analyze(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "settings.yaml"
    config.write_text("lr: 0.001\nanalysis_every: 3\n")
    assert main(base_args(tiny, out) + ["--compare", "kd,random", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    for word in ("teacher", "sage", "kd", "random", "test acc", "sage-fast export"):
        assert word in printed
    saved = json.loads((out / "config.json").read_text())
    assert saved["lr"] == 0.001 and saved["analysis_every"] == 3 and saved["compare"] == ["kd", "random"]
    assert (out / "config.yaml").is_file() and (out / "results.txt").is_file()
    results = json.loads((out / "results.json").read_text())
    assert [m["mode"] for m in results["modes"]] == ["sage", "kd", "random"]
    for mode in ("sage", "kd", "random"):
        records = [json.loads(line) for line in (out / mode / "metrics.jsonl").read_text().splitlines()]
        kinds = {r["kind"] for r in records}
        assert {"train", "eval", "final"} <= kinds
        assert (out / mode / "checkpoint.pt").is_file()
        assert (out / mode / "trained" / "student" / "config.json").is_file()
        final = records[-1]
        assert 0.0 <= final["accuracy"] <= 1.0 and final["examples_per_second"] > 0
        assert ("analysis" in kinds) == (mode != "kd")
    synthetic = {m["mode"]: m["synthetic_examples"] for m in results["modes"]}
    assert synthetic["kd"] == 0 and synthetic["sage"] == synthetic["random"] > 0
    assert list((out / "sage").glob("loss_map_round*.png"))

    png = tmp_path / "map.png"
    assert main(["analyze", str(out), "--output", str(png)]) == 0
    assert png.is_file() and str(png) in capsys.readouterr().out


def bad_cases(tiny, tmp):
    data = str(tiny / "data.csv")
    empty = write_csv(tmp / "empty.csv", [])
    truncated = tmp / "truncated.csv"
    truncated.write_text("text,label\n" + "a fine movie,1\n" * 30 + '"an unterminated')
    unknown_labels = write_csv(tmp / "eval.csv", [("good", 1), ("bad", 7)])
    three = make_teacher(tmp / "teacher3", 3)
    three_labels = write_csv(tmp / "three.csv", [(f"text number {i}", i % 3) for i in range(60)])
    return {
        "missing column": (["--text-column", "review"], "review"),
        "empty dataset": (["--train-file", str(empty)], "no examples"),
        "truncated file": (["--train-file", str(truncated)], "truncated"),
        "labels outside the label set": (["--eval-file", str(unknown_labels)], "never occur"),
        "teacher with other label count": (["--teacher", str(three)], "labels"),
        "two-label teacher, three-label data": (["--train-file", str(three_labels)], "2 labels"),
        "missing model": (["--teacher", str(tmp / "nowhere")], "nowhere"),
        "max_length below 2": (["--max-length", "1"], "max-length"),
        "pool smaller than a round": (["--pool-size", "8"], "pool-size"),
        "quantile outside (0, 1)": (["--quantile", "1.5"], "quantile"),
        "resume without a run": (["--resume", "--output-dir", str(tmp / "none")], "config.json"),
        "missing data file": (["--train-file", str(tmp / "absent.csv")], "absent.csv"),
        "bad student spec": (["--student", "from-teacher:x"], "from-teacher"),
        "missing student folder": (["--student", str(tmp / "no_student")], "no_student"),
    }, data


def test_bad_input_exits_2_with_one_paragraph(tiny, tmp_path, capsys):
    cases, _ = bad_cases(tiny, tmp_path)
    capsys.readouterr()  # drop what making the fixtures printed
    for name, (extra, needle) in cases.items():
        code = main(base_args(tiny, tmp_path / "out") + extra)
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        # Hugging Face may print loading bars first; the answer itself is the last line, one paragraph.
        last = err.strip().splitlines()[-1]
        assert "Traceback" not in err and last.startswith("sage-fast distill: ") and needle in last, (name, err)


def test_analyze_without_a_checkpoint(tmp_path, capsys):
    assert main(["analyze", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    damaged = tmp_path / "checkpoint.pt"
    damaged.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    assert main(["analyze", str(damaged)]) == 2
    err = capsys.readouterr().err
    assert "not a readable checkpoint" in err and "written by sage-fast distill" in err and "Traceback" not in err


def test_help_shows_each_default_once_and_no_unset_ones(capsys):
    from sage_fast.cli import COMMANDS

    for command in COMMANDS:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in text and "(default: False)" not in text, command
        assert not re.search(r"\(default:[^)]*\) \(default:", text), command
    with pytest.raises(SystemExit):
        main(["teacher", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--batch-size BATCH_SIZE examples per optimiser step (default: 32)" in text


def test_ctrl_c_before_training_says_how_to_resume(tiny, tmp_path, capsys, monkeypatch):
    from sage_fast.train import loop

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    monkeypatch.setattr(loop, "build_setup", ctrl_c)
    assert main(base_args(tiny, out) + ["--compare", "none"]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"sage-fast distill --resume --output-dir {out}" in err
    monkeypatch.undo()
    assert main(["distill", "--resume", "--output-dir", str(out)]) == 0
    assert (out / "results.json").is_file()
