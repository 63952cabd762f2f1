"""Bad input to every command ends in one paragraph on stderr and exit code 2: never a traceback,
never a run that goes on with a wrong reading of what was asked. One case per id."""
import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from cli_fixtures import distill_args, make_data, make_teacher, write_csv  # noqa: E402

from sage_fast.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny teacher, data, and one finished kd run (its checkpoint and trained folder)."""
    root = tmp_path_factory.mktemp("bad_input")
    make_teacher(root / "teacher", 2)
    make_data(root / "data.csv")
    assert main(distill_args(root, root / "run") + ["--mode", "kd", "--compare", "none"]) == 0
    return root


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # A case that slipped through to the hub would wait on retries instead of failing fast.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


CASES = {}


def case(name):
    def register(build):
        CASES[name] = build
        return build
    return register


def copy_of(root, tmp, what):
    return shutil.copytree(root / what, tmp / what.replace("/", "_"))


def config_file(tmp, values):
    path = tmp / "settings.yaml"
    path.write_text(json.dumps(values))
    return str(path)


def teacher_args(root, tmp, *extra):
    return ["teacher", "--base", str(root / "teacher"), "--train-file", str(root / "data.csv"), "--epochs", "0.1",
            "--max-length", "8", "--cache-dir", str(tmp / "teachers"), "--no-progress", *extra]


# ---------------------------------------------------------------------------------- data files
@case("distill: missing column")
def _(root, tmp):
    return distill_args(root, tmp / "out") + ["--text-column", "review"], "review"


@case("distill: a batch that micro-batches cannot share")
def _(root, tmp):
    return distill_args(root, tmp / "out") + ["--batch-size", "10", "--grad-accumulation", "4"], "grad-accumulation"


@case("distill: no micro-batch")
def _(root, tmp):
    return distill_args(root, tmp / "out") + ["--grad-accumulation", "0"], "grad-accumulation"


@case("distill: a collective timeout of zero")
def _(root, tmp):
    return distill_args(root, tmp / "out") + ["--dist-timeout", "0"], "dist-timeout"


@case("distill: empty dataset")
def _(root, tmp):
    return distill_args(root, tmp / "out") + ["--train-file", str(write_csv(tmp / "empty.csv", []))], "no examples"


@case("distill: truncated file")
def _(root, tmp):
    truncated = tmp / "truncated.csv"
    truncated.write_text("text,label\n" + "a fine movie,1\n" * 30 + '"an unterminated')
    return distill_args(root, tmp / "out") + ["--train-file", str(truncated)], "truncated"


@case("distill: labels outside the label set")
def _(root, tmp):
    unknown = write_csv(tmp / "eval.csv", [("good", 1), ("bad", 7)])
    return distill_args(root, tmp / "out") + ["--eval-file", str(unknown)], "never occur"


@case("distill: missing data file")
def _(root, tmp):
    return distill_args(root, tmp / "out") + ["--train-file", str(tmp / "absent.csv")], "absent.csv"


@case("distill: a single label")
def _(root, tmp):
    single = write_csv(tmp / "single.csv", [(f"text {i}", "pos") for i in range(40)])
    return distill_args(root, tmp / "out") + ["--train-file", str(single)], "has the label 'pos'"


@case("teacher: a single label")
def _(root, tmp):
    single = write_csv(tmp / "single.csv", [(f"text {i}", "pos") for i in range(40)])
    return teacher_args(root, tmp, "--train-file", str(single)), "has the label 'pos'"


@case("distill: an empty label cell")
def _(root, tmp):
    rows = [(f"text {i}", "" if i == 7 else ["fresh", "rotten"][i % 2]) for i in range(40)]
    return distill_args(root, tmp / "out") + ["--train-file", str(write_csv(tmp / "cells.csv", rows))], "line 9"


@case("teacher: an empty label cell")
def _(root, tmp):
    rows = [(f"text {i}", " " if i == 3 else ["fresh", "rotten"][i % 2]) for i in range(40)]
    return teacher_args(root, tmp, "--train-file", str(write_csv(tmp / "cells.csv", rows))), "line 5"


# ---------------------------------------------------------------------------------- models
@case("distill: teacher with another label count")
def _(root, tmp):
    return distill_args(root, tmp / "out") + ["--teacher", str(make_teacher(tmp / "teacher3", 3))], "labels"


@case("distill: two-label teacher, three-label data")
def _(root, tmp):
    three = write_csv(tmp / "three.csv", [(f"text number {i}", i % 3) for i in range(60)])
    return distill_args(root, tmp / "out") + ["--train-file", str(three)], "2 labels"


@case("distill: missing teacher folder")
def _(root, tmp):
    return distill_args(root, tmp / "out") + ["--teacher", str(tmp / "nowhere")], "nowhere"


@case("distill: bad student spec")
def _(root, tmp):
    return distill_args(root, tmp / "out") + ["--student", "from-teacher:x"], "from-teacher"


@case("distill: missing student folder")
def _(root, tmp):
    return distill_args(root, tmp / "out") + ["--student", str(tmp / "no_student")], "no_student"


@case("distill: teacher with a corrupted config.json")
def _(root, tmp):
    teacher = copy_of(root, tmp, "teacher")
    (teacher / "config.json").write_text('{"model_type": "bert", ')
    return distill_args(root, tmp / "out") + ["--teacher", str(teacher)], "config.json is not a readable model config"


@case("distill: teacher with an empty config.json")
def _(root, tmp):
    teacher = copy_of(root, tmp, "teacher")
    (teacher / "config.json").write_text("")
    return distill_args(root, tmp / "out") + ["--teacher", str(teacher)], "(it is empty)"


@case("distill: student folder with a corrupted config.json")
def _(root, tmp):
    student = copy_of(root, tmp, "teacher")
    (student / "config.json").write_text("[1, 2")
    return distill_args(root, tmp / "out") + ["--student", str(student)], "config.json is not a readable model config"


@case("teacher: base with a corrupted config.json")
def _(root, tmp):
    base = copy_of(root, tmp, "teacher")
    (base / "config.json").write_text("{{")
    return teacher_args(root, tmp, "--base", str(base)), "config.json is not a readable model config"


@case("distill: teacher with garbage model.safetensors")
def _(root, tmp):
    teacher = copy_of(root, tmp, "teacher")
    (teacher / "model.safetensors").write_bytes(b"\x00garbage" * 64)
    return distill_args(root, tmp / "out") + ["--teacher", str(teacher)], "cannot load the weights"


@case("distill: teacher with a truncated model.safetensors")
def _(root, tmp):
    teacher = copy_of(root, tmp, "teacher")
    weights = (teacher / "model.safetensors").read_bytes()
    (teacher / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    return distill_args(root, tmp / "out") + ["--teacher", str(teacher)], "cannot load the weights"


@case("distill: student with garbage pytorch_model.bin")
def _(root, tmp):
    student = copy_of(root, tmp, "teacher")
    (student / "model.safetensors").unlink()
    (student / "pytorch_model.bin").write_bytes(b"garbage" * 64)
    return distill_args(root, tmp / "out") + ["--student", str(student)], "cannot load the weights"


@case("teacher: base with garbage model.safetensors")
def _(root, tmp):
    base = copy_of(root, tmp, "teacher")
    (base / "model.safetensors").write_bytes(b"garbage" * 64)
    return teacher_args(root, tmp, "--base", str(base)), "cannot load the weights"


@case("distill: teacher folder without tokenizer files")
def _(root, tmp):
    teacher = copy_of(root, tmp, "teacher")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (teacher / name).unlink()
    return distill_args(root, tmp / "out") + ["--teacher", str(teacher)], "holds no tokenizer: none of tokenizer.json"


@case("teacher: base folder without tokenizer files")
def _(root, tmp):
    base = copy_of(root, tmp, "teacher")
    (base / "tokenizer.json").unlink()
    return teacher_args(root, tmp, "--base", str(base)), "holds no tokenizer: none of tokenizer.json"


@case("distill: a student config file that is not a model config")
def _(root, tmp):
    (tmp / "student.json").write_text(json.dumps({"hidden_size": 32}))
    return distill_args(root, tmp / "out") + ["--student", str(tmp / "student.json")], "no model_type"


# ---------------------------------------------------------------------------------- settings
@case("distill: max_length below 2")
def _(root, tmp):
    return distill_args(root, tmp / "out") + ["--max-length", "1"], "max-length"


@case("distill: pool smaller than a round")
def _(root, tmp):
    return distill_args(root, tmp / "out") + ["--pool-size", "8"], "pool-size"


for _flags, _needle in [(["--generator", "substitute", "--substitute-share", "1.5"], "substitute-share must be in [0.0, 1.0]"),
                        (["--generator", "boundary", "--boundary-step-size", "0"], "boundary-step-size must be in (0.0"),
                        (["--generator", "boundary", "--partners", "boundary"], "steps from the anchor alone"),
                        (["--synthetic-share", "1"], "synthetic-share must be in [0.0, 1.0)")]:
    CASES[f"distill: {' '.join(_flags)}"] = (
        lambda root, tmp, flags=_flags, needle=_needle: (distill_args(root, tmp / "out") + flags, needle))


@case("distill: quantile outside (0, 1)")
def _(root, tmp):
    return distill_args(root, tmp / "out") + ["--quantile", "1.5"], "quantile"


@case("distill: unknown device name")
def _(root, tmp):
    return distill_args(root, tmp / "out") + ["--device", "gpu0"], "cuda:N"


@case("distill: a CUDA device torch does not see")
def _(root, tmp):
    return distill_args(root, tmp / "out") + ["--device", f"cuda:{torch.cuda.device_count()}"], "--device cpu"


@case("analyze: unknown device name")
def _(root, tmp):
    return ["analyze", str(root / "run" / "kd"), "--device", "tpu"], "cuda:N"


@case("teacher: unknown device name")
def _(root, tmp):
    return teacher_args(root, tmp, "--device", "gpu0"), "cuda:N"


@case("teacher: a CUDA device torch does not see")
def _(root, tmp):
    return teacher_args(root, tmp, "--device", f"cuda:{torch.cuda.device_count()}"), "--device cpu"


for _key, _value, _needle in [("compare", 5, "compare"), ("train_file", 5, "train-file must be text"),
                              ("output_dir", 5, "output-dir must be text"), ("cache_dir", 5, "cache-dir must be text"),
                              ("teacher", 5, "teacher must be text"), ("text_pair_column", 5, "text-pair-column"),
                              ("progress", "yes", "progress must be true or false"),
                              ("max_train_examples", "10", "max-train-examples must be an integer")]:
    def _build(root, tmp, key=_key, value=_value, needle=_needle):
        args = distill_args(root, tmp / "out")
        flag = "--" + key.replace("_", "-")
        if flag in args:  # a flag would win over the file
            at = args.index(flag)
            del args[at:at + 2]
        if key == "progress":
            args.remove("--no-progress")
        return args + ["--config", config_file(tmp, {key: value})], needle
    CASES[f"distill: config file with {_key}: {_value!r}"] = _build


# ---------------------------------------------------------------------------------- folders
@case("distill: --output-dir is a file")
def _(root, tmp):
    (tmp / "a_file").write_text("x")
    return distill_args(root, tmp / "a_file"), "is a file, not a folder"


@case("distill: --output-dir inside a file")
def _(root, tmp):
    (tmp / "a_file").write_text("x")
    return distill_args(root, tmp / "a_file" / "run"), "is a file, not a folder"


@case("distill: --cache-dir is a file")
def _(root, tmp):
    (tmp / "a_file").write_text("x")
    return distill_args(root, tmp / "out") + ["--cache-dir", str(tmp / "a_file")], "is a file, not a folder"


@case("teacher: --cache-dir is a file")
def _(root, tmp):
    (tmp / "a_file").write_text("x")
    return teacher_args(root, tmp, "--cache-dir", str(tmp / "a_file")), "is a file, not a folder"


@case("export: --out is a file")
def _(root, tmp):
    (tmp / "a_file").write_text("x")
    return ["export", str(root / "run" / "kd" / "trained"), "--out", str(tmp / "a_file")], "is a file, not a folder"


# ---------------------------------------------------------------------------------- runs and checkpoints
@case("distill: resume without a run")
def _(root, tmp):
    return distill_args(root, tmp / "out") + ["--resume", "--output-dir", str(tmp / "none")], "config.json"


for _missing in ("mode", "config", "student"):
    def _resume(root, tmp, missing=_missing):
        run = copy_of(root, tmp, "run")
        state = torch.load(run / "kd" / "checkpoint.pt", weights_only=False)
        del state[missing]
        torch.save(state, run / "kd" / "checkpoint.pt")
        return ["distill", "--resume", "--output-dir", str(run), "--epochs", "2", "--no-progress"], f"lacks {missing}"

    def _analyze(root, tmp, missing=_missing, resume=_resume):
        argv, needle = resume(root, tmp, missing)
        return ["analyze", str(tmp / "run" / "kd")], needle

    CASES[f"distill: --resume from a checkpoint lacking {_missing}"] = _resume
    CASES[f"analyze: a checkpoint lacking {_missing}"] = _analyze


@case("export: corrupted sage_fast_interface.json")
def _(root, tmp):
    trained = copy_of(root, tmp, "run/kd/trained")
    (trained / "sage_fast_interface.json").write_text('{"format": 1, "teacher": ')
    return ["export", str(trained), "--out", str(tmp / "exported")], "sage_fast_interface.json is damaged"


@case("export: sage_fast_interface.json lacking entries")
def _(root, tmp):
    trained = copy_of(root, tmp, "run/kd/trained")
    (trained / "sage_fast_interface.json").write_text('{"format": 1}')
    return ["export", str(trained), "--out", str(tmp / "exported")], "no text entry for teacher, tokenizer, adapter"


@case("export: sage_fast_interface.json holding a list")
def _(root, tmp):
    trained = copy_of(root, tmp, "run/kd/trained")
    (trained / "sage_fast_interface.json").write_text("[]")
    return ["export", str(trained), "--out", str(tmp / "exported")], "a JSON list"


# ---------------------------------------------------------------------------------- second pass: new inputs
@case("distill: a JSON object as a label")
def _(root, tmp):
    path = tmp / "nested.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": {"value": i % 2}}) + "\n" for i in range(40)))
    return distill_args(root, tmp / "out") + ["--train-file", str(path)], "holds a JSON object or list"


@case("distill: the label column read as text")
def _(root, tmp):
    return distill_args(root, tmp / "out") + ["--text-column", "label"], "is also a text column"


@case("distill: --max-length beyond the teacher's positions")
def _(root, tmp):
    return distill_args(root, tmp / "out") + ["--max-length", "100"], "more tokens than the model takes (64)"


def _edited_teacher(root, tmp, **changes):
    teacher = copy_of(root, tmp, "teacher")
    config = json.loads((teacher / "config.json").read_text())
    config.update(changes)
    (teacher / "config.json").write_text(json.dumps(config))
    return teacher


@case("distill: teacher config with num_labels 'x'")
def _(root, tmp):
    return distill_args(root, tmp / "out") + ["--teacher", str(_edited_teacher(root, tmp, num_labels="x"))], \
        "has num_labels 'x'"


@case("distill: teacher config with id2label a list")
def _(root, tmp):
    return distill_args(root, tmp / "out") + ["--teacher", str(_edited_teacher(root, tmp, id2label=["a", "b"]))], \
        "expected an object"


@case("distill: teacher weights that do not fit its config")
def _(root, tmp):
    teacher = _edited_teacher(root, tmp, hidden_size=64, intermediate_size=128)
    return distill_args(root, tmp / "out") + ["--teacher", str(teacher)], "do not fit its config.json"


@case("teacher: base weights that do not fit its config")
def _(root, tmp):
    return teacher_args(root, tmp, "--base", str(_edited_teacher(root, tmp, num_hidden_layers=4))), \
        "do not fit its config.json"


@case("distill: a teacher tokenizer larger than its vocabulary")
def _(root, tmp):
    import transformers

    teacher = copy_of(root, tmp, "teacher")  # the model re-made with 1,000 words, beside a 30,522-word tokenizer
    config = transformers.AutoConfig.from_pretrained(teacher)
    config.vocab_size = 1000
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(teacher)
    return distill_args(root, tmp / "out") + ["--teacher", str(teacher)], "the tokenizer belongs to another model"


@case("export: --max-length 0")
def _(root, tmp):
    return ["export", str(root / "run" / "kd" / "trained"), "--out", str(tmp / "x"), "--max-length", "0"], \
        "--max-length must be at least 2"


@case("export: damaged student weights")
def _(root, tmp):
    trained = copy_of(root, tmp, "run/kd/trained")
    (trained / "student" / "model.safetensors").write_bytes(b"zz" * 16)
    return ["export", str(trained), "--out", str(tmp / "exported")], "cannot load the weights of the student model"


for _key, _value, _needle in [("mode", "bogus", "mode 'bogus' is none of"), ("global_step", -5, "global_step below 0"),
                              ("rng", {}, "random-number states lack"), ("metrics", [1, 2], "metrics are not records")]:
    def _resume(root, tmp, key=_key, value=_value, needle=_needle):
        run = copy_of(root, tmp, "run")
        state = torch.load(run / "kd" / "checkpoint.pt", weights_only=False)
        state[key] = value
        torch.save(state, run / "kd" / "checkpoint.pt")
        return ["distill", "--resume", "--output-dir", str(run), "--epochs", "2", "--no-progress"], needle

    def _analyze(root, tmp, key=_key, value=_value, needle=_needle, resume=_resume):
        resume(root, tmp, key, value, needle)
        return ["analyze", str(tmp / "run" / "kd")], needle

    CASES[f"distill: --resume from a checkpoint with {_key} {_value!r}"] = _resume
    CASES[f"analyze: a checkpoint with {_key} {_value!r}"] = _analyze


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_paragraph(root, tmp_path, capsys, name):
    argv, needle = CASES[name](root, tmp_path)
    capsys.readouterr()  # drop what making the case printed
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    # Hugging Face may print loading bars first; the answer itself is the last line, one paragraph.
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"sage-fast {argv[0]}: ") and needle in last, err


def test_a_refusal_of_the_system_is_one_paragraph_too(root, tmp_path, capsys):
    """What the operating system refuses (here: writing a picture over a folder) is said in one line
    with exit 1, as for a full disk or a missing permission."""
    code = main(["analyze", str(root / "run" / "kd"), "--output", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code in (1, 2) and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("sage-fast analyze: ") and str(tmp_path) in err
