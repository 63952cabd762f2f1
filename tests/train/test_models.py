import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sage_fast.assets import minilm_path  # noqa: E402
from sage_fast.train import DataError, ModelError  # noqa: E402
from sage_fast.train.models import (  # noqa: E402
    VectorInterface,
    encoder_layers,
    export_student,
    load_classifier,
    student_from_config,
    student_from_teacher,
)

VOCAB = 120


def tiny(kind: str, *, hidden=32, layers=2, vocab=VOCAB, labels=3):
    common = dict(vocab_size=vocab, num_labels=labels, max_position_embeddings=64)
    if kind == "bert":
        config = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                         intermediate_size=2 * hidden, **common)
    elif kind == "distilbert":
        config = transformers.DistilBertConfig(dim=hidden, n_layers=layers, n_heads=2, hidden_dim=2 * hidden, **common)
    elif kind == "roberta":
        config = transformers.RobertaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                            intermediate_size=2 * hidden, pad_token_id=1, type_vocab_size=1, **common)
    elif kind == "mpnet":
        config = transformers.MPNetConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                          intermediate_size=2 * hidden, pad_token_id=1, **common)
    else:
        raise AssertionError(kind)
    return transformers.AutoModelForSequenceClassification.from_config(config).eval()


def padded_batch(pad_id: int, lengths=(7, 3, 1, 5), vocab=VOCAB):
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        tokens = torch.randint(3, vocab, (n,))
        ids[row, :n] = tokens
        mask[row, :n] = 1
    return ids, mask


@pytest.mark.parametrize("kind", ["bert", "distilbert", "roberta", "mpnet"])
def test_inputs_embeds_path_equals_input_ids_path(kind, seed):
    model = tiny(kind)
    interface = VectorInterface(model, tiny(kind))
    ids, mask = padded_batch(model.config.pad_token_id)
    with torch.no_grad():
        by_ids = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        by_vectors = interface.teacher_forward(interface.embed(ids), mask, output_hidden_states=True)
    torch.testing.assert_close(by_vectors.logits, by_ids.logits, atol=1e-6, rtol=0)
    for ours, theirs in zip(by_vectors.hidden_states, by_ids.hidden_states):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_roberta_needs_the_explicit_position_ids():
    model = tiny("roberta")
    ids, mask = padded_batch(1, lengths=(6, 2))
    with torch.no_grad():
        by_ids = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[0]
        naive = model(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask,
                      output_hidden_states=True).hidden_states[0]
    assert not torch.allclose(naive[1], by_ids[1], atol=1e-4)  # pads numbered differently without them


@pytest.mark.parametrize("kind", ["bert", "distilbert", "roberta", "mpnet"])
def test_student_from_teacher_copies_every_kth_layer(kind):
    teacher = tiny(kind, layers=5)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = student_from_teacher(teacher, every_k=2)
    assert student.config.sage_fast_teacher_layers == [0, 2, 4]
    _, _, teacher_layers = encoder_layers(teacher)
    _, _, student_layers = encoder_layers(student)
    assert len(student_layers) == 3
    for student_index, teacher_index in enumerate([0, 2, 4]):
        for (name, a), (_, b) in zip(student_layers[student_index].named_parameters(),
                                     teacher_layers[teacher_index].named_parameters()):
            assert torch.equal(a, b), name
            assert a.data_ptr() != b.data_ptr()
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())  # teacher untouched
    explicit = student_from_teacher(teacher, layers=[4, 1])
    assert torch.equal(next(encoder_layers(explicit)[2][0].parameters()), next(teacher_layers[4].parameters()))
    ids, mask = padded_batch(teacher.config.pad_token_id)
    assert explicit(input_ids=ids, attention_mask=mask).logits.shape == (4, 3)


def test_student_from_teacher_rejects_bad_layers():
    teacher = tiny("bert", layers=3)
    with pytest.raises(ModelError, match="layers"):
        student_from_teacher(teacher, layers=[0, 3])
    with pytest.raises(ModelError, match="every_k"):
        student_from_teacher(teacher, every_k=0)


def test_interface_checks_shapes_and_keeps_teacher_frozen():
    teacher, student = tiny("bert"), tiny("bert", hidden=16)
    interface = VectorInterface(teacher, student).train()
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert isinstance(interface.adapter, torch.nn.Linear)
    ids, mask = padded_batch(0)
    x = interface.embed(ids)
    assert not x.requires_grad
    with pytest.raises(ValueError, match="attention_mask"):
        interface.student_forward(x, mask[:, :2])
    with pytest.raises(ValueError, match="x must be"):
        interface.student_forward(x[..., :16], mask)
    loss = interface.student_forward(x, mask).logits.sum()
    loss.backward()
    assert interface.adapter.weight.grad is not None
    assert {id(p) for p in interface.trainable_parameters()} == \
        {id(p) for p in list(student.parameters()) + list(interface.adapter.parameters())}


def test_lstsq_adapter_reproduces_a_linear_map():
    teacher, student = tiny("bert"), tiny("bert", hidden=16)
    true_map = torch.nn.Linear(32, 16)
    with torch.no_grad():
        student.get_input_embeddings().weight.copy_(true_map(teacher.get_input_embeddings().weight))
    interface = VectorInterface(teacher, student, adapter_init="lstsq")
    torch.testing.assert_close(interface.adapter.weight, true_map.weight, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


TEXTS = ["a gripping, beautifully shot film", "dull.", "neither the plot nor the actors could save this mess"]
PAIRS = ["is it good?", "really", "what about the actors?"]


@pytest.mark.parametrize("student_kind,hidden,pairs", [("roberta", 24, False), ("distilbert", 32, False),
                                                        ("bert", 16, True), ("mpnet", 24, False)])
def test_export_round_trip_from_text(tmp_path, tokenizer, student_kind, hidden, pairs):
    torch.manual_seed(0)
    teacher = tiny("bert", vocab=tokenizer.vocab_size, labels=2)
    student = tiny(student_kind, hidden=hidden, labels=2)
    interface = VectorInterface(teacher, student)
    batch = tokenizer(TEXTS, PAIRS if pairs else None, padding="longest", return_tensors="pt")
    with torch.no_grad():
        trained = interface.student_forward(interface.embed(batch["input_ids"]), batch["attention_mask"],
                                            token_type_ids=batch.get("token_type_ids")).logits
    out = export_student(interface, tokenizer, tmp_path / "student")
    assert student.get_input_embeddings().num_embeddings == VOCAB  # the live student is not modified
    loaded_tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    assert loaded.config.vocab_size == tokenizer.vocab_size
    with torch.no_grad():
        again = loaded(**loaded_tokenizer(TEXTS, PAIRS if pairs else None, padding="longest",
                                          return_tensors="pt")).logits
    torch.testing.assert_close(again, trained, atol=1e-5, rtol=0)


def test_student_from_config_overrides():
    student = student_from_config(tiny("bert").config, num_labels=4, num_hidden_layers=1, hidden_size=16,
                                  intermediate_size=32)
    assert student.config.num_hidden_layers == 1 and student.config.num_labels == 4
    assert student.get_input_embeddings().embedding_dim == 16


def test_load_classifier_missing_folder_is_a_usage_error(tmp_path):
    with pytest.raises(ModelError, match="no model folder"):
        load_classifier(str(tmp_path / "nope"), 2)
    with pytest.raises(ModelError, match="cannot load"):
        load_classifier(str(tmp_path), 2)


def test_load_classifier_adds_a_head_to_a_saved_base_model(tmp_path):
    base = transformers.BertModel(tiny("bert").config)
    base.save_pretrained(tmp_path)
    model = load_classifier(str(tmp_path), 5)
    assert model.config.num_labels == 5
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, base.embeddings.word_embeddings.weight)


def test_student_from_a_config_file_of_any_name(tmp_path):
    path = tmp_path / "my_student.json"
    tiny("roberta", layers=1).config.to_json_file(path)
    student = student_from_config(str(path), num_labels=2)
    assert type(student).__name__ == "RobertaForSequenceClassification" and student.config.num_hidden_layers == 1
    path.write_text('{"hidden_size": 8}')
    with pytest.raises(ModelError, match="no model_type"):
        student_from_config(str(path), num_labels=2)


@pytest.mark.parametrize("content, message", [
    ("", r"it is empty"), ('{"model_type": "bert",', "JSONDecodeError"), ("[1, 2]", "must hold a JSON object"),
    (b"\xff\xfe\x00", "UnicodeDecodeError"),
])
def test_a_damaged_config_json_is_a_usage_error(tmp_path, content, message):
    tiny("bert").save_pretrained(tmp_path)
    config = tmp_path / "config.json"
    config.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ModelError, match=f"config.json is not a readable model config.*{message}|{message}"):
        load_classifier(str(tmp_path), 3)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "garbage .bin"])
def test_unreadable_weights_are_a_usage_error(tmp_path, damage):
    tiny("bert").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    if damage == "garbage":
        weights.write_bytes(b"\x00 not safetensors" * 10)
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        weights.unlink()
        (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle" * 10)
    with pytest.raises(ModelError, match="cannot load the weights of the model in"):
        load_classifier(str(tmp_path), 3)


def test_a_folder_without_tokenizer_files_is_refused(tmp_path):
    from sage_fast.train.models import load_tokenizer

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    tiny("bert", vocab=tokenizer.vocab_size).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.vocab_size == tokenizer.vocab_size and loaded.model_max_length == 64  # the model's positions
    for name in ("tokenizer.json", "vocab.txt"):
        (tmp_path / name).unlink(missing_ok=True)
    with pytest.raises(ModelError, match="holds no tokenizer: none of tokenizer.json, vocab.txt.*config.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "vocab.txt").write_text("")  # there, but empty: special tokens only
    with pytest.raises(ModelError, match="knows only its .* special tokens"):
        load_tokenizer(str(tmp_path))


def test_a_tokenizer_that_does_not_fit_its_model_is_refused(tmp_path):
    from sage_fast.train.models import load_tokenizer

    tiny("bert").save_pretrained(tmp_path)  # 120 word embeddings
    transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="has 30522 tokens but the model there has 120 word embeddings"):
        load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("kind, usable", [("bert", 64), ("roberta", 62)])
def test_inputs_longer_than_the_positions_are_refused(tmp_path, kind, usable):
    from sage_fast.train.data import Split, encode
    from sage_fast.train.models import load_tokenizer

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    tiny(kind, vocab=tokenizer.vocab_size).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.model_max_length == usable
    split = Split(["word " * 300, "short"], [0, 1])
    assert encode(split, loaded, max_length=usable)["input_ids"].shape == (2, usable)
    with pytest.raises(DataError, match=f"max-length {usable + 1} is more tokens than the model takes"):
        encode(split, loaded, max_length=usable + 1)


@pytest.mark.parametrize("key, value", [("num_labels", "x"), ("id2label", [1, 2]), ("vocab_size", 0),
                                        ("architectures", "Bert")])
def test_config_entries_of_the_wrong_type_are_refused(tmp_path, key, value):
    import json

    tiny("bert").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=re.escape(f"has {key} {value!r}")):
        load_classifier(str(tmp_path), 3)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    import json

    tiny("bert", hidden=32).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(hidden_size=64, intermediate_size=128)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="do not fit its config.json: .* weight.s. are missing or of another shape"):
        load_classifier(str(tmp_path), 3)
    # A head of another size is made afresh, as it should be.
    tiny("bert", hidden=32).save_pretrained(tmp_path)
    assert load_classifier(str(tmp_path), 5).config.num_labels == 5


@pytest.mark.parametrize("kind", ["bert", "distilbert", "roberta", "mpnet"])
def test_the_trainers_vector_inputs_give_what_token_ids_give(kind):
    # the Trainer integration feeds its models through vector_inputs, with the same position ids
    from sage_fast.integrations.processes import vector_inputs

    model = tiny(kind)
    ids, mask = padded_batch(model.config.pad_token_id or 0)
    with torch.no_grad():
        by_ids = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[0]
        inputs = vector_inputs(model, model.get_input_embeddings()(ids), mask)
        by_vectors = model(**inputs, output_hidden_states=True).hidden_states[0]
    # every position, pads included: a RoBERTa-style model numbers pads apart from the tokens
    torch.testing.assert_close(by_vectors, by_ids, atol=1e-6, rtol=0)
