import bz2
import json
from collections import defaultdict

import pytest
import torch

from sage_fast.assets import rotten_tomatoes_path
from sage_fast.cli import main
from sage_fast.train import DataError
from sage_fast.train.data import Split, encode, load_files, load_rotten_tomatoes_rows, load_task, movie_bucket


@pytest.fixture(scope="module")
def rotten():
    return load_task("rotten_tomatoes")


def test_rotten_tomatoes_sizes_and_labels(rotten):
    assert (len(rotten.train), len(rotten.validation), len(rotten.test)) == (10227, 1224, 1301)
    assert rotten.label_names == ["rotten", "fresh"] and rotten.num_labels == 2
    assert set(rotten.train.labels) == {0, 1} and rotten.train.text_pairs is None
    assert rotten.train.ids == list(range(len(rotten.train)))
    everything = [(t, y) for s in rotten.splits().values() for t, y in zip(s.texts, s.labels)]
    assert len(everything) == len(set(everything)) == 12752


def test_rotten_tomatoes_split_is_grouped_by_movie(rotten):
    movie_of = {(text, label): movie for text, label, movie in load_rotten_tomatoes_rows(rotten_tomatoes_path())}
    movies = defaultdict(set)
    for name, split in rotten.splits().items():
        for text, label in zip(split.texts, split.labels):
            movies[name].add(movie_of[(text, label)])
    assert not movies["train"] & movies["validation"]
    assert not movies["train"] & movies["test"]
    assert not movies["validation"] & movies["test"]
    assert movie_bucket("the_matrix") == movie_bucket("the_matrix")


def test_rotten_tomatoes_subsets_are_deterministic(rotten):
    a = load_task("rotten_tomatoes", max_train_examples=300, max_eval_examples=50)
    b = load_task("rotten_tomatoes", max_train_examples=300, max_eval_examples=50)
    assert (len(a.train), len(a.validation), len(a.test)) == (300, 50, 50)
    assert a.fingerprint() == b.fingerprint() != rotten.fingerprint()
    assert set(a.train.texts) <= set(rotten.train.texts)
    assert load_task("rotten_tomatoes", max_train_examples=300, seed=1).fingerprint() != a.fingerprint()


def write_csv(path, rows, header="text,label"):
    path.write_text("\n".join([header] + rows) + "\n")
    return path


def test_csv_with_string_labels_and_eval_file(tmp_path):
    train = write_csv(tmp_path / "train.csv", [f"good movie {i},pos" if i % 2 else f"bad movie {i},neg"
                                               for i in range(30)])
    test = write_csv(tmp_path / "test.csv", ["fine,pos", "awful,neg", "ok,pos"])
    data = load_files(train, test, task="mine")
    assert data.label_names == ["neg", "pos"]
    assert data.test.labels == [1, 0, 1] and data.test.texts[0] == "fine"
    assert len(data.train) + len(data.validation) == 30 and len(data.validation) == 3
    assert all(("good" in t) == (y == 1) for t, y in zip(data.train.texts, data.train.labels))


def test_jsonl_pairs_with_int_labels_split_80_10_10(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"question {i}", "s": f"sentence {i}", "y": i % 3}) for i in range(40)))
    data = load_task("pairs", train_file=path, text_column="q", text_pair_column="s", label_column="y")
    assert data.label_names == ["0", "1", "2"] and data.is_pair_task
    assert (len(data.train), len(data.validation), len(data.test)) == (32, 4, 4)
    for split in data.splits().values():
        for q, s, y in zip(split.texts, split.text_pairs, split.labels):
            i = int(q.split()[1])
            assert s == f"sentence {i}" and y == i % 3


def test_numeric_labels_sort_numerically(tmp_path):
    train = write_csv(tmp_path / "t.csv", [f"x{i},{i % 11}" for i in range(44)])
    assert load_files(train).label_names == [str(i) for i in range(11)]


@pytest.mark.parametrize("name,content,message", [
    ("missing.csv", "sentence,label\nhello,1\n", "no column 'text'.*'sentence', 'label'"),
    ("short.csv", "text,label\nhello,1\ncut", "fewer fields"),
    ("empty.csv", "text,label\n", "holds no examples"),
    ("cut.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "lab', "line 2 is not valid JSON"),
    ("list.jsonl", '[1, 2]\n', "expected an object"),
    ("data.parquet", "x", "unknown file type"),
])
def test_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_files(path)


def test_truncated_bz2(tmp_path):
    blob = bz2.compress(("text,label\n" + "".join(f"row {i},1\n" for i in range(500))).encode())
    path = tmp_path / "data.csv.bz2"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="cannot read"):
        load_files(path)
    with pytest.raises(DataError, match="cannot read"):
        load_rotten_tomatoes_rows(path)


def test_eval_labels_outside_train_labels(tmp_path):
    train = write_csv(tmp_path / "train.csv", [f"t{i},{'a' if i % 2 else 'b'}" for i in range(20)])
    test = write_csv(tmp_path / "test.csv", ["x,a", "y,c"])
    with pytest.raises(DataError, match=r"labels \['c'\] that never occur"):
        load_files(train, test)


def test_unknown_task_and_eval_without_train():
    with pytest.raises(DataError, match="unknown task 'imdb'"):
        load_task("imdb")
    with pytest.raises(DataError, match="needs --train-file"):
        load_task("rotten_tomatoes", eval_file="x.csv")


def test_encode_pads_to_longest_and_caps(tmp_path):
    transformers = pytest.importorskip("transformers")
    from sage_fast.assets import minilm_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    split = Split(["short", "a somewhat longer sentence here", "x " * 100], [0, 1, 0], ["p", "q", "r"])
    batch = encode(split, tokenizer, max_length=12)
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (3, 12)
    assert batch["attention_mask"].sum(1).tolist()[0] == 5  # [CLS] short [SEP] p [SEP]
    assert batch["token_type_ids"][0, 3].item() == 1
    assert batch["labels"].tolist() == [0, 1, 0] and batch["ids"].tolist() == [0, 1, 2]
    single = encode(Split(["one", "two words"], [0, 1]), tokenizer, max_length=64)
    assert single["input_ids"].shape == (2, 4)
    with pytest.raises(DataError, match="max_length"):
        encode(split, tokenizer, max_length=1)


@pytest.mark.parametrize("args,message", [
    (["--train-file", "{tmp}/nothere.csv"], "does not exist"),
    (["--train-file", "{tmp}/bad.csv"], "no column 'text'"),
    (["--task", "imdb"], "unknown task"),
])
def test_cli_reports_bad_data_without_traceback(tmp_path, capsys, args, message):
    (tmp_path / "bad.csv").write_text("review,label\ngreat,1\n")
    code = main(["teacher", "--cache-dir", str(tmp_path)] + [a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("sage-fast teacher: ") and message in err
    assert "Traceback" not in err


def test_glue_uses_validation_as_test_and_carves_validation(monkeypatch):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"question": datasets.Value("string"), "sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["entailment", "not_entailment"])})

    def part(n, tag):
        return datasets.Dataset.from_dict({"question": [f"{tag} q{i}" for i in range(n)],
                                           "sentence": [f"{tag} s{i}" for i in range(n)],
                                           "label": [i % 2 for i in range(n)]}, features=features)

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or
                        datasets.DatasetDict(train=part(50, "train"), validation=part(7, "dev")))
    data = load_task("qnli")
    assert calls == [("glue", "qnli")]
    assert data.label_names == ["entailment", "not_entailment"] and data.is_pair_task
    assert (len(data.train), len(data.validation), len(data.test)) == (45, 5, 7)
    assert data.test.texts[0] == "dev q0" and data.test.text_pairs[0] == "dev s0"
    assert not set(data.train.texts) & set(data.validation.texts)


def test_glue_offline_is_a_clear_usage_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="--train-file"):
        load_task("sst2")


@pytest.mark.parametrize("name", ["bom.csv", "bom.tsv", "bom.csv.gz", "bom.jsonl"])
def test_a_utf8_byte_order_mark_is_read(tmp_path, name):
    """Spreadsheet programs start UTF-8 files with a byte-order mark; it is not part of the first column."""
    import gzip

    if name.endswith(".jsonl"):
        text = "".join(json.dumps({"text": f"row {i}", "label": i % 2}) + "\n" for i in range(20))
    else:
        sep = "\t" if ".tsv" in name else ","
        text = f"text{sep}label\n" + "".join(f"row {i}{sep}{i % 2}\n" for i in range(20))
    raw = b"\xef\xbb\xbf" + text.encode()
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    data = load_files(path)
    assert data.label_names == ["0", "1"] and len(data.train) + len(data.validation) + len(data.test) == 20
    assert all(not t.startswith("\ufeff") for t in data.train.texts)


@pytest.mark.parametrize("label", ["", "   "])
def test_an_empty_label_cell_is_refused_with_its_line(tmp_path, label):
    rows = [f"text {i},{label if i == 4 else ('fresh', 'rotten')[i % 2]}" for i in range(20)]
    path = write_csv(tmp_path / "cells.csv", rows)
    with pytest.raises(DataError, match=r"cells.csv line 6 \(example 5\) has an empty label in column 'label'"):
        load_files(path)
    jsonl = tmp_path / "cells.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"t{i}", "label": label if i == 2 else i % 2}) + "\n"
                             for i in range(20)))
    with pytest.raises(DataError, match=r"line 3 \(example 3\) has an empty label"):
        load_files(jsonl)


def test_one_label_is_refused(tmp_path):
    path = write_csv(tmp_path / "one.csv", [f"text {i},pos" for i in range(30)])
    with pytest.raises(DataError, match="every example in .*one.csv has the label 'pos'"):
        load_files(path)
    mixed = write_csv(tmp_path / "mixed.csv", [f"text {i},{'pos' if i else 'neg'}" for i in range(30)])
    # Kept subsets must still hold two labels: two rows drawn from 24 are almost surely both 'pos'.
    with pytest.raises(DataError, match="training examples of .* kept have the label 'pos'"):
        load_files(mixed, max_train_examples=2, seed=3)


def test_json_labels_one_and_one_point_zero_are_one_label(tmp_path):
    path = tmp_path / "floats.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": [1, 1.0, 0, 0.0][i % 4]}) + "\n" for i in range(40)))
    assert load_files(path).label_names == ["0", "1"]


@pytest.mark.parametrize("column, value", [("label", {"a": 1}), ("label", [1]), ("text", ["a", "b"])])
def test_nested_json_values_are_refused(tmp_path, column, value):
    path = tmp_path / "nested.jsonl"
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(20)]
    rows[6][column] = value
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"line 7 \(example 7\) holds a JSON object or list"):
        load_files(path)


@pytest.mark.parametrize("columns, message", [
    (dict(text_column="label"), "the label column 'label' is also a text column"),
    (dict(text_pair_column="label"), "the label column 'label' is also a text column"),
    (dict(text_pair_column="text"), "are both 'text'"),
])
def test_the_label_column_is_never_read_as_text(tmp_path, columns, message):
    path = write_csv(tmp_path / "d.csv", [f"t{i},{i % 2}" for i in range(20)])
    with pytest.raises(DataError, match=message):
        load_files(path, **columns)
