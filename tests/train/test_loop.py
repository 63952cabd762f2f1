"""The SAGE loop on tiny random-initialised models: resuming after Ctrl-C gives the same run."""
import csv
import os
import random
import signal

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("umap")

from sage_fast.train import checkpoint, loop  # noqa: E402
from sage_fast.train.setup import build_setup  # noqa: E402
from sage_fast.train.stopping import StopRequest, Stopped, TrainingInterrupted  # noqa: E402
from sage_fast.train.config import resolve  # noqa: E402


def make_tiny_task(root, dropout: float = 0.1):
    """A 4-layer, 32-wide BERT classifier over MiniLM's tokenizer, and a 150-row sentiment CSV.
    ``dropout`` 0 makes runs that deal a step's rows out differently comparable number for number."""
    import transformers

    from sage_fast.assets import minilm_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=4,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                     num_labels=2, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    transformers.BertForSequenceClassification(config).save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    rng = random.Random(0)
    positive, negative = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "dull"]
    filler = ["the", "movie", "was", "plot", "very", "a"]
    with open(root / "data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(150):
            words = [rng.choice(filler) for _ in range(rng.randint(2, 8))]
            words.append(rng.choice(positive if i % 2 else negative))
            rng.shuffle(words)
            writer.writerow([" ".join(words), i % 2])
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_task(tmp_path_factory.mktemp("tiny"))


def tiny_config(tiny, out, **overrides):
    flags = dict(teacher=str(tiny / "teacher"), student="from-teacher:2", train_file=str(tiny / "data.csv"),
                 epochs=2, batch_size=16, max_length=16, analysis_every=6, synthetic_per_round=16, pool_size=32,
                 synthetic_per_batch=4, n_neighbors=5, compare="none", progress=False, device="cpu",
                 output_dir=str(out), cache_dir=str(tiny / "cache"))
    flags.update(overrides)
    return resolve(flags)


def final_state(out):
    state = checkpoint.load(out / "sage")
    return state, [r for r in state["metrics"] if r["kind"] in ("eval", "final", "analysis")]


def warm_up(tiny, out):
    """The first training run in a process differs from later ones in the last bits of the weights
    (about 1e-7 after a few steps; it is not the Triton interpreter, MKL's code path or oneDNN, and
    the teacher cache is a hit either way). UMAP then magnifies that into a different map. So runs
    compared bit for bit inside one process come after one throwaway run; across processes, where
    every run is a first run, tests/train/test_run_folder.py resumes a real SIGTERM-ed process."""
    loop.run(tiny_config(tiny, out, max_steps=2), log=lambda *a: None)


def test_resume_after_ctrl_c_matches_an_uninterrupted_run(tiny, tmp_path):
    warm_up(tiny, tmp_path / "warm-up")
    straight = loop.run(tiny_config(tiny, tmp_path / "straight"), log=lambda *a: None)
    assert straight["modes"][0]["analysis_rounds"] == 2  # after steps 6 and 12 of 16

    def ctrl_c_at_step_7(run):
        if run.global_step == 7:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match="--resume"):
        loop.run(tiny_config(tiny, tmp_path / "resumed"), log=lambda *a: None, callbacks=[ctrl_c_at_step_7])
    interrupted = checkpoint.load(tmp_path / "resumed" / "sage")
    assert interrupted["global_step"] == 7 and interrupted["epoch"] == 0 and not interrupted["done"]
    resumed = loop.run(tiny_config(tiny, tmp_path / "resumed"), resume=True, log=lambda *a: None)

    a, a_records = final_state(tmp_path / "straight")
    b, b_records = final_state(tmp_path / "resumed")
    assert resumed["modes"][0]["accuracy"] == straight["modes"][0]["accuracy"]
    for x, y in zip(a_records, b_records):
        assert {k: v for k, v in x.items() if "seconds" not in k and k not in ("png",) and "share" not in k
                and k != "examples_per_second"} == \
               {k: v for k, v in y.items() if "seconds" not in k and k not in ("png",) and "share" not in k
                and k != "examples_per_second"}
    for name, tensor in a["student"].items():
        assert torch.equal(tensor, b["student"][name]), name
    a_synth, b_synth = a["synthesizer"], b["synthesizer"]
    assert a_synth["rounds"] == b_synth["rounds"] == 2
    assert torch.equal(a_synth["pool"]["vectors"], b_synth["pool"]["vectors"])
    assert torch.equal(a_synth["pool"]["logits"], b_synth["pool"]["logits"])
    assert torch.equal(a_synth["profile"]["loss"], b_synth["profile"]["loss"])
    assert torch.equal(a_synth["profile"]["embedding"], b_synth["profile"]["embedding"])
    assert torch.equal(a_synth["analysis_generator"], b_synth["analysis_generator"])
    lines = (tmp_path / "resumed" / "sage" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(b["metrics"])  # no line logged twice across the interruption


def test_kd_mode_never_synthesises_and_teacher_outputs_are_cached(tiny, tmp_path):
    cache = tmp_path / "cache"  # its own cache: this test must not rely on another having filled one
    first = []
    summary = loop.run(tiny_config(tiny, tmp_path / "kd", mode="kd", epochs=1, cache_dir=str(cache)),
                       log=first.append)
    row = summary["modes"][0]
    assert row["synthetic_examples"] == 0 and row["analysis_rounds"] == 0
    state = checkpoint.load(tmp_path / "kd" / "kd")
    assert state["done"] and state["synthesizer"] is None
    assert not any("from the cache" in line for line in first)
    again = []
    loop.run(tiny_config(tiny, tmp_path / "kd_again", mode="kd", max_steps=1, cache_dir=str(cache)), log=again.append)
    assert sum("from the cache" in line for line in again) == 3  # train, validation and test


def test_n_neighbors_larger_than_the_data_is_capped_and_analyze_needs_no_optimizer(tiny, tmp_path, monkeypatch,
                                                                                     capsys):
    summary = loop.run(tiny_config(tiny, tmp_path / "big_k", epochs=1, max_steps=7, n_neighbors=10_000),
                       log=lambda *a: None)
    assert summary["modes"][0]["analysis_rounds"] >= 1

    def no_optimizer(*args, **kwargs):
        raise AssertionError("sage-fast analyze built an optimizer")

    monkeypatch.setattr(torch.optim, "AdamW", no_optimizer)
    from sage_fast.cli import main

    png = tmp_path / "map.png"
    assert main(["analyze", str(tmp_path / "big_k"), "--output", str(png), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert png.is_file() and "sage student after 7 steps: 120 training examples" in printed


def test_rounds_beside_training_give_the_same_student_however_slow_the_worker(tiny, tmp_path, monkeypatch):
    """analysis_lag 2: each round's snapshot is taken at its due step (6, 12) and its rows join the
    pool two steps later (8, 14), whether the worker is done early or training has to wait for it."""
    import time

    from sage_fast.synthesis import background

    warm_up(tiny, tmp_path / "warm-up")
    fast = loop.run(tiny_config(tiny, tmp_path / "fast", analysis_lag=2), log=lambda *a: None)
    plan_round = background.plan_round

    def slow_plan_round(*args, **kwargs):
        time.sleep(1.5)  # far longer than two steps of the tiny model: training waits at the due step
        return plan_round(*args, **kwargs)

    monkeypatch.setattr(background, "plan_round", slow_plan_round)
    slow = loop.run(tiny_config(tiny, tmp_path / "slow", analysis_lag=2), log=lambda *a: None)
    monkeypatch.undo()
    inline = loop.run(tiny_config(tiny, tmp_path / "inline", analysis_lag=0), log=lambda *a: None)

    a, a_records = final_state(tmp_path / "fast")
    b, b_records = final_state(tmp_path / "slow")
    c, c_records = final_state(tmp_path / "inline")
    rounds = [(r["round"], r["snapshot_step"], r["step"]) for r in a_records if r["kind"] == "analysis"]
    assert rounds == [(1, 6, 8), (2, 12, 14)]
    assert [(r["round"], r["step"]) for r in c_records if r["kind"] == "analysis"] == [(1, 6), (2, 12)]
    assert sum(r["wait_seconds"] for r in b_records if r["kind"] == "analysis") > 1.0  # the slow worker was waited for
    assert slow["modes"][0]["accuracy"] == fast["modes"][0]["accuracy"]
    for name, tensor in a["student"].items():
        assert torch.equal(tensor, b["student"][name]), name
    assert torch.equal(a["synthesizer"]["pool"]["vectors"], b["synthesizer"]["pool"]["vectors"])
    assert torch.equal(a["synthesizer"]["profile"]["loss"], b["synthesizer"]["profile"]["loss"])
    # The lag is the one difference from training that waits for each round: the students differ.
    assert any(not torch.equal(tensor, c["student"][name]) for name, tensor in a["student"].items())
    assert a["round_in_flight"] is None and c["round_in_flight"] is None


def test_a_checkpoint_taken_while_a_round_is_in_flight_resumes_exactly(tiny, tmp_path):
    warm_up(tiny, tmp_path / "warm-up")
    straight = loop.run(tiny_config(tiny, tmp_path / "straight", analysis_lag=2), log=lambda *a: None)

    def ctrl_c_at_step_7(run):  # the round whose snapshot was taken after step 6 joins after step 8
        if run.global_step == 7:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        loop.run(tiny_config(tiny, tmp_path / "resumed", analysis_lag=2), log=lambda *a: None,
                 callbacks=[ctrl_c_at_step_7])
    interrupted = checkpoint.load(tmp_path / "resumed" / "sage")
    in_flight = interrupted["round_in_flight"]
    assert in_flight["step"] == 6 and in_flight["due_step"] == 8 and in_flight["snapshot"]["round"] == 1
    assert interrupted["synthesizer"]["rounds"] == 0 and interrupted["synthesizer"]["pool"]["size"] == 0
    resumed = loop.run(tiny_config(tiny, tmp_path / "resumed", analysis_lag=2), resume=True, log=lambda *a: None)
    assert resumed["modes"][0]["accuracy"] == straight["modes"][0]["accuracy"]
    a, _ = final_state(tmp_path / "straight")
    b, _ = final_state(tmp_path / "resumed")
    for name, tensor in a["student"].items():
        assert torch.equal(tensor, b["student"][name]), name
    assert torch.equal(a["synthesizer"]["pool"]["vectors"], b["synthesizer"]["pool"]["vectors"])

    with pytest.raises(checkpoint.CheckpointError, match="analysis-lag 2 there, 0 here"):
        run = loop.ModeRun(build_setup(tiny_config(tiny, tmp_path / "other", analysis_lag=0),
                                            log=lambda *a: None), "sage", tmp_path / "other" / "sage")
        run.load(interrupted)


def test_a_second_sigterm_still_lets_the_step_checkpoint_a_second_ctrl_c_does_not():
    # Under a scheduler that signals every process of a job, a torchrun worker gets SIGTERM twice
    # (the scheduler's and torchrun's); it must still finish its step and checkpoint.
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
        with pytest.raises(Stopped):
            os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(Stopped):
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested
            os.kill(os.getpid(), signal.SIGINT)


def test_rounds_come_three_an_epoch_by_default_each_joining_one_step_before_the_next(tiny, tmp_path):
    config = tiny_config(tiny, tmp_path / "run", analysis_every=None, analysis_lag=None)
    run = loop.ModeRun(build_setup(config, log=lambda *a: None), "sage", tmp_path / "run" / "sage")
    schedule = run.session.schedule
    assert run.steps_per_epoch == 8 and schedule.interval == 2 and schedule.lag == 1  # 120 rows of 16
    assert schedule.planned() == [(2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15)]
    longer = loop.ModeRun(build_setup(tiny_config(tiny, tmp_path / "run", analysis_every=5, analysis_lag=None),
                                      log=lambda *a: None), "sage", tmp_path / "run" / "sage")
    assert longer.session.schedule.lag == 4  # the worker has every step between rounds but the last
    assert longer.session.schedule.planned() == [(5, 9), (10, 14), (15, 15)]  # the last: inline, no step left


def test_same_label_partners_give_synthetic_rows_their_gold_label_in_the_loss(tiny, tmp_path, monkeypatch):
    """With --partners same-label the pool's rows carry the gold label their two ends share, and the
    step's cross-entropy sees it (other rows stay on the teacher's soft labels alone)."""
    from sage_fast.synthesis import SyntheticRows

    given = []
    loss_labels = SyntheticRows.loss_labels

    def spy(self, ignore_index=-100):
        labels = loss_labels(self, ignore_index)
        given.append((labels, ignore_index))
        return labels

    monkeypatch.setattr(SyntheticRows, "loss_labels", spy)
    loop.run(tiny_config(tiny, tmp_path / "run", partners="same-label"), log=lambda *a: None)
    pool = checkpoint.load(tmp_path / "run" / "sage")["synthesizer"]["pool"]
    assert pool["size"] > 0 and set(pool["labels"].tolist()) <= {-1, 0, 1}
    assert int((pool["labels"] >= 0).sum()) >= pool["size"] // 2  # neighbours of one class are the rule here
    assert given, "the step never asked the synthetic rows for their labels"
    assert any(bool((labels >= 0).any()) for labels, _ in given)
    assert all(set(labels.tolist()) <= {0, 1, ignore} for labels, ignore in given)


@pytest.mark.parametrize("generator", ["substitute", "boundary"])
def test_every_generator_resumes_exactly_with_its_round_in_flight(tiny, tmp_path, generator):
    """Substitution draws from the round's seed, boundary steps read the student where the round
    joins the pool: either way a resumed run with a round in flight ends on the same student."""
    settings = dict(analysis_lag=2, max_steps=10, generator=generator, substitute_span=0.3, boundary_steps=2)
    warm_up(tiny, tmp_path / "warm-up")
    straight = loop.run(tiny_config(tiny, tmp_path / "straight", **settings), log=lambda *a: None)

    def ctrl_c_at_step_7(run):  # the round planned after step 6 joins after step 8
        if run.global_step == 7:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        loop.run(tiny_config(tiny, tmp_path / "resumed", **settings), log=lambda *a: None,
                 callbacks=[ctrl_c_at_step_7])
    assert checkpoint.load(tmp_path / "resumed" / "sage")["round_in_flight"]["due_step"] == 8
    resumed = loop.run(tiny_config(tiny, tmp_path / "resumed", **settings), resume=True, log=lambda *a: None)
    assert resumed["modes"][0]["accuracy"] == straight["modes"][0]["accuracy"]
    a, _ = final_state(tmp_path / "straight")
    b, _ = final_state(tmp_path / "resumed")
    assert a["synthesizer"]["rounds"] == 1 and a["synthesizer"]["pool"]["size"] == 16
    for name, tensor in a["student"].items():
        assert torch.equal(tensor, b["student"][name]), name
    assert torch.equal(a["synthesizer"]["pool"]["vectors"], b["synthesizer"]["pool"]["vectors"])
