"""Data and settings that could be read two ways are either read the one sensible way or refused:
same-named CSV columns, labels written 1 and 1.0, long cells, YAML's 1e-3, a one-label test file."""
import pytest

from sage_fast.train import DataError
from sage_fast.train.config import ConfigError, resolve
from sage_fast.train.data import load_files


def write(path, text):
    path.write_text(text)
    return path


def rows(n, label=lambda i: i % 2):
    return "".join(f"text number {i},{label(i)}\n" for i in range(n))


def test_two_columns_of_one_name_are_refused(tmp_path):
    path = write(tmp_path / "d.csv", "text,label,label\n" + "".join(f"t{i},{i % 2},{1 - i % 2}\n" for i in range(30)))
    with pytest.raises(DataError, match="column name\\(s\\) used more than once in its header \\('label'\\)"):
        load_files(path)


@pytest.mark.parametrize("suffix", ["csv", "tsv"])
def test_labels_written_as_integral_numbers_are_one_label(tmp_path, suffix):
    spellings = ["1", "1.0", "0", "0.0", "01", "1e0"]
    sep = "," if suffix == "csv" else "\t"
    body = "".join(f"text number {i}{sep}{spellings[i % len(spellings)]}\n" for i in range(60))
    data = load_files(write(tmp_path / f"d.{suffix}", f"text{sep}label\n" + body))
    assert data.label_names == ["0", "1"]
    texts = [*data.train.texts, *data.validation.texts, *data.test.texts]
    labels = [*data.train.labels, *data.validation.labels, *data.test.labels]
    for text, label in zip(texts, labels):
        written = spellings[int(text.split()[-1]) % len(spellings)]
        assert label == (0 if written in ("0", "0.0") else 1), (text, written)


def test_a_cell_over_128_kib_is_read(tmp_path):
    long = "word " * 40_000  # 200 KB: truncated to max-length tokens anyway
    path = write(tmp_path / "d.csv", "text,label\n" + f'"{long}",1\n' + rows(30))
    data = load_files(path)
    assert max(len(t) for t in [*data.train.texts, *data.validation.texts, *data.test.texts]) == len(long)


def test_a_yaml_number_without_a_dot_is_a_number(tmp_path):
    config = write(tmp_path / "settings.yaml", "lr: 1e-3\nteacher_lr: 5E-4\n")
    resolved = resolve({}, config)
    assert resolved.lr == 0.001 and resolved.teacher_lr == 0.0005
    with pytest.raises(ConfigError, match="lr must be a finite number, got 'fast'"):
        resolve({}, write(tmp_path / "bad.yaml", "lr: fast\n"))


def test_a_test_file_of_one_label_is_refused_as_a_train_file_is(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\n" + rows(40))
    test = write(tmp_path / "test.csv", "text,label\n" + rows(10, label=lambda i: 1))
    with pytest.raises(DataError, match="every example in .*test.csv has the label '1'"):
        load_files(train, test)
