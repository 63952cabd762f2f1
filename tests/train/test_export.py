import pytest
import torch

transformers = pytest.importorskip("transformers")

from sage_fast.assets import minilm_path  # noqa: E402
from sage_fast.cli import main  # noqa: E402
from sage_fast.train import ModelError  # noqa: E402
from sage_fast.train.models import VectorInterface, load_interface, save_interface  # noqa: E402

TEXTS = ["an unexpectedly moving story", "flat, lifeless and loud", "ok"]


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


def tiny_pair(vocab_size):
    torch.manual_seed(0)
    teacher = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=2)).eval()
    student = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
        vocab_size=50, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=80, pad_token_id=1, type_vocab_size=1, num_labels=2)).eval()
    return teacher, student


def logits_of(interface, tokenizer):
    batch = tokenizer(TEXTS, padding="longest", return_tensors="pt")
    with torch.no_grad():
        return interface.student_forward(interface.embed(batch["input_ids"]), batch["attention_mask"]).logits


@pytest.mark.parametrize("teacher_by_path", [False, True])
def test_checkpoint_round_trip_and_export_command(tmp_path, tokenizer, capsys, teacher_by_path):
    teacher, student = tiny_pair(tokenizer.vocab_size)
    interface = VectorInterface(teacher, student)
    with torch.no_grad():
        interface.adapter.weight.mul_(3.0)  # a trained-looking adapter, not the initial one
    teacher_path = None
    if teacher_by_path:
        teacher_path = tmp_path / "teacher"
        teacher.save_pretrained(teacher_path)
        tokenizer.save_pretrained(teacher_path)
    checkpoint = save_interface(interface, tmp_path / "ckpt", teacher_path=teacher_path,
                                tokenizer=None if teacher_by_path else tokenizer)
    loaded, loaded_tokenizer = load_interface(checkpoint)
    torch.testing.assert_close(logits_of(loaded.eval(), loaded_tokenizer), logits_of(interface, tokenizer),
                               atol=1e-6, rtol=0)

    assert main(["export", str(checkpoint), "--out", str(tmp_path / "out")]) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    exported = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out",
                                                                               local_files_only=True).eval()
    exported_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out", local_files_only=True)
    with torch.no_grad():
        from_text = exported(**exported_tokenizer(TEXTS, padding="longest", return_tensors="pt")).logits
    torch.testing.assert_close(from_text, logits_of(interface, tokenizer), atol=1e-5, rtol=0)


def test_export_of_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "not a trained student" in err and "<mode>/trained" in err and "Traceback" not in err
    with pytest.raises(ModelError):
        load_interface(tmp_path)


def test_export_finds_the_trained_folder_of_a_run_or_mode_folder(tmp_path, tokenizer, capsys):
    import json

    teacher, student = tiny_pair(tokenizer.vocab_size)
    run = tmp_path / "run"
    save_interface(VectorInterface(teacher, student), run / "kd" / "trained", tokenizer=tokenizer)
    run.joinpath("config.json").write_text(json.dumps({"mode": "kd"}))
    for given in (run, run / "kd"):
        # into a folder of its own: the run folder itself is refused as --out (the export replaces it)
        assert main(["export", str(given), "--out", str(tmp_path / f"exported-{given.name}")]) == 0
        assert (tmp_path / f"exported-{given.name}" / "config.json").is_file()
    capsys.readouterr()


@pytest.mark.parametrize("damage", ["interface", "adapter"])
def test_a_damaged_trained_folder_is_a_usage_error(tmp_path, tokenizer, damage):
    teacher, student = tiny_pair(tokenizer.vocab_size)
    folder = save_interface(VectorInterface(teacher, student), tmp_path / "trained", tokenizer=tokenizer)
    if damage == "interface":
        (folder / "sage_fast_interface.json").write_text('{"teacher": "teacher", "adapter": "linear", "tok')
    else:
        (folder / "adapter.pt").write_bytes(b"PK\x03\x04 torn")
    message = "sage_fast_interface.json is damaged" if damage == "interface" else "adapter.pt"
    with pytest.raises(ModelError, match=message):
        load_interface(folder)
