"""Rounds made beside training (BackgroundRounds): the same pool as a round made inline from the same
snapshot, however slow the worker; a checkpoint with a round in flight; the pool's host-side widths."""
import threading
import time

import pytest
import torch

pytest.importorskip("umap")

from sage_fast.synthesis import (BackgroundRounds, GeneratorInputs, SAGESynthesizer, SynthesisConfig,  # noqa: E402
                                 SyntheticPool, background)
from sage_fast.synthesis.pool import used_lengths  # noqa: E402
from test_synthesizer import D_T, DIM, N, label, planted, synthesizer, vectors_of  # noqa: E402


def pool_of(synth):
    n = len(synth.pool)
    return synth.pool.vectors[:n], synth.pool.masks[:n], synth.pool.logits[:n], synth.pool.hidden[2][:n]


def assert_same_pool(a, b):
    for x, y in zip(pool_of(a), pool_of(b)):
        assert torch.equal(x, y)
    assert torch.equal(a.pool.lengths, b.pool.lengths)
    assert torch.equal(a.analysis_generator.get_state(), b.analysis_generator.get_state())


def train_a_little(synth, step):
    """What training does to the profile while a round is in flight: new losses for some rows."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, N, (12,), generator=g)
    synth.observe(ids, 5 * torch.rand(12, generator=g), torch.randn(12, planted()[0].shape[1], generator=g))


def slowed(monkeypatch, seconds, calls=None):
    """plan_round on the worker made slow, so training reaches the due step first."""
    plan_round = background.plan_round

    def slow(*args, **kwargs):
        time.sleep(seconds)
        if calls is not None:
            calls.append(threading.current_thread().name)
        return plan_round(*args, **kwargs)

    monkeypatch.setattr(background, "plan_round", slow)


def test_a_round_beside_training_fills_the_pool_as_an_inline_round_from_its_snapshot(monkeypatch):
    inline, beside = synthesizer(), synthesizer()
    record_inline = inline.build(inline.plan(step=4), vectors_of, label)  # the snapshot is taken at step 4
    calls = []
    slowed(monkeypatch, 0.3, calls)
    rounds = BackgroundRounds(beside, vectors_of, label, lag=3)
    assert rounds.start(4) and rounds.pending.due_step == 7 and not rounds.due(6) and rounds.due(7)
    for step in (5, 6, 7):  # training goes on and changes the profile; the round is not affected
        train_a_little(beside, step)
        assert len(beside.pool) == 0
    record = rounds.finish()
    assert calls and calls[0] != threading.current_thread().name  # planned on the worker thread
    assert record.wait_seconds > 0  # the worker was slower than training here, so training waited
    assert (record.round, record.step, record.snapshot_step, record.synthetic) == (1, 7, 4, record_inline.synthetic)
    assert record.threshold == record_inline.threshold and rounds.pending is None
    assert_same_pool(inline, beside)
    assert beside.rounds == 1


def test_the_worker_speed_never_changes_the_rows(monkeypatch):
    def run(delay):
        synth = synthesizer()
        rounds = BackgroundRounds(synth, vectors_of, label, lag=2)
        with monkeypatch.context() as patch:
            slowed(patch, delay)
            for step in range(1, 9):
                train_a_little(synth, step)
                if rounds.due(step):
                    rounds.finish()
                if step in (2, 5):
                    rounds.start(step)
        return synth

    fast, slow = run(0.0), run(0.4)
    assert fast.rounds == slow.rounds == 2
    assert_same_pool(fast, slow)
    assert torch.equal(fast.profile.loss, slow.profile.loss)


def test_a_checkpoint_with_a_round_in_flight_resumes_to_the_same_pool(monkeypatch):
    straight = synthesizer()
    rounds = BackgroundRounds(straight, vectors_of, label, lag=2)
    rounds.start(3)
    saved = {"synth": straight.state_dict(), "rounds": rounds.state_dict()}
    assert saved["rounds"]["due_step"] == 5 and saved["rounds"]["snapshot"]["round"] == 1
    train_a_little(straight, 4)
    rounds.finish()

    resumed = synthesizer()
    again = BackgroundRounds(resumed, vectors_of, label, lag=2)
    resumed.load_state_dict(saved["synth"])
    slowed(monkeypatch, 0.2)
    again.load_state_dict(saved["rounds"])  # the worker plans it again when first needed
    assert again.pending.due_step == 5 and again.due(5)
    train_a_little(resumed, 4)
    again.finish()
    assert_same_pool(straight, resumed)

    fresh = BackgroundRounds(synthesizer(), vectors_of, label, lag=2)
    fresh.synthesizer.rounds = 1
    with pytest.raises(ValueError, match="round 1 but the synthesizer is at round 1"):
        fresh.load_state_dict(saved["rounds"])
    fresh.load_state_dict(None)
    assert fresh.pending is None and fresh.state_dict() is None


def test_rounds_join_in_order_and_errors_reach_the_training_thread(monkeypatch):
    synth = synthesizer()
    rounds = BackgroundRounds(synth, vectors_of, label, lag=1)
    with pytest.raises(RuntimeError, match="no round is in flight"):
        rounds.finish()
    rounds.start(1)
    with pytest.raises(RuntimeError, match="still in flight"):
        rounds.start(2)
    rounds.finish()

    def broken(*args, **kwargs):
        raise ValueError("the analysis failed")

    monkeypatch.setattr(background, "plan_round", broken)
    rounds.start(3)
    with pytest.raises(ValueError, match="the analysis failed"):
        rounds.finish()
    assert synth.rounds == 1  # nothing joined the pool


def test_too_few_rows_start_nothing_and_bad_arguments():
    empty = SAGESynthesizer(SynthesisConfig(n_neighbors=5), num_examples=N, embedding_dim=6)
    rounds = BackgroundRounds(empty, vectors_of, label, lag=2)
    assert rounds.start(0) is False and rounds.pending is None
    for lag in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="lag"):
            BackgroundRounds(empty, vectors_of, label, lag=lag)
    with pytest.raises(ValueError, match="synthesizer must be a SAGESynthesizer"):
        BackgroundRounds("synth", vectors_of, label, lag=1)
    with pytest.raises(ValueError, match="state must be None or a dict"):
        rounds.load_state_dict({"snapshot": {}})


def test_the_loss_map_is_drawn_by_the_worker(tmp_path):
    pytest.importorskip("matplotlib")
    synth = synthesizer()
    rounds = BackgroundRounds(synth, vectors_of, label, lag=1, plot_path=lambda n: tmp_path / f"round{n}.png")
    rounds.start(2)
    record = rounds.finish()
    assert record.png == str(tmp_path / "round1.png") and (tmp_path / "round1.png").stat().st_size > 0


def test_used_lengths_and_pool_widths(monkeypatch):
    masks = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0]])
    assert used_lengths(masks).tolist() == [2, 4, 0, 3]
    pool = SyntheticPool(4)
    vectors = torch.arange(4.0).view(4, 1, 1).expand(4, 4, 2).clone()
    pool.add(vectors[:2], masks[:2], torch.zeros(2, 2))
    pool.add(vectors[2:], masks[2:], torch.zeros(2, 2))
    assert pool.lengths.tolist() == [2, 4, 0, 3]
    index = pool.draw(4, torch.Generator().manual_seed(0))
    assert pool.width_of(index) == 4 and pool.width_of(torch.tensor([0, 2])) == 2
    pool.add(vectors[:1], torch.tensor([[1, 0, 0, 0]]), torch.zeros(1, 2))  # fifo: slot 0 is replaced
    assert pool.lengths.tolist() == [1, 4, 0, 3]
    with monkeypatch.context() as patch:  # given on the host: the masks are not read for them
        patch.setattr("sage_fast.synthesis.pool.used_lengths", None)
        pool.add(vectors[1:2], masks[1:2], torch.zeros(1, 2), lengths=torch.tensor([4]))
    assert pool.lengths.tolist() == [1, 4, 0, 3]
    with pytest.raises(ValueError, match="lengths must be a host tensor with one value per row"):
        pool.add(vectors[:2], masks[:2], torch.zeros(2, 2), lengths=torch.tensor([4]))
    copy = SyntheticPool(4)
    copy.load_state_dict(pool.state_dict())
    assert torch.equal(copy.lengths, pool.lengths)
    vectors_, masks_, _, _, _ = copy.take(torch.tensor([3]))
    assert torch.equal(masks_, masks[3:])


def test_sample_knows_the_width_of_what_it_drew():
    synth = synthesizer()
    synth.build(synth.plan(), vectors_of, label)
    rows = synth.sample(5, torch.Generator().manual_seed(2))
    assert rows.width == int(used_lengths(rows.mask).max())


def test_numba_keeps_the_analysis_compilations_in_the_folder_it_is_given(tmp_path):
    """A round's first fit in a process loads umap-learn's compiled functions from disk: numba's
    cache directory is the folder use_compilation_cache names unless the user chose one, and umap's
    functions are cached (the serial layout epoch, not its parallel twin, which would share the entry)."""
    import os
    import subprocess
    import sys

    from sage_fast.assets import cache_root

    script = (
        "import os, sys\n"
        "from numba.core.caching import NullCache\n"
        "from sage_fast.regions import analyzer\n"
        "analyzer.use_compilation_cache(sys.argv[1])\n"
        "analyzer._import_umap()\n"
        "import numba\n"
        "layouts = sys.modules['umap.layouts']\n"
        "print(os.environ['NUMBA_CACHE_DIR'], numba.config.CACHE_DIR)\n"
        "print(isinstance(layouts._nb_optimize_layout_euclidean_single_epoch._cache, NullCache),\n"
        "      isinstance(layouts._nb_optimize_layout_euclidean_single_epoch_parallel._cache, NullCache),\n"
        "      isinstance(sys.modules['umap.umap_'].smooth_knn_dist._cache, NullCache))\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["SAGE_FAST_CACHE"] = str(cache_root())  # where earlier runs left their compilations: quick
    out = subprocess.run([sys.executable, "-c", script, str(cache_root() / "numba")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    directories, cached = out.stdout.splitlines()
    assert directories.split() == [str(cache_root() / "numba")] * 2
    assert cached.split() == ["False", "True", "False"]

    chosen = {**env, "NUMBA_CACHE_DIR": str(tmp_path / "mine")}
    out = subprocess.run([sys.executable, "-c", "import os\nfrom sage_fast.regions import analyzer\n"
                          "analyzer.use_compilation_cache('elsewhere')\nanalyzer._numba_cache_dir()\n"
                          "print(os.environ['NUMBA_CACHE_DIR'])"],
                         env=chosen, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == str(tmp_path / "mine"), out.stderr


def test_the_analysis_leaves_the_training_threads_as_they_were():
    """numba's OpenMP layer, started by UMAP's first parallel function in a process, sets its
    thread's OpenMP count (torch's intra-op count there) to all cores: a run that asked for one
    thread trained on all of them after its first inline round, and a warm-up on another thread
    changed which. A new process, since numba starts its layer once per process."""
    import subprocess
    import sys

    script = ("import torch\n"
              "from sage_fast.regions import LossRegionAnalyzer\n"
              "torch.set_num_threads(1)\n"
              "g = torch.Generator().manual_seed(0)\n"
              "LossRegionAnalyzer(n_neighbors=5, random_state=0).fit(torch.randn(80, 8, generator=g),\n"
              "                                                      torch.rand(80, generator=g))\n"
              "print(torch.get_num_threads())\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "NUMBA_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


def test_a_program_that_ends_with_a_round_in_flight_waits_for_it_and_exits_cleanly(tmp_path):
    """The interpreter ends a daemon thread that is inside a torch call by aborting the whole process:
    a training loop that returned with a round in flight crashed at exit. The worker is waited for
    instead, so the round ends and the exit code is the program's."""
    from pathlib import Path

    from exit_fixtures import assert_waited_and_exited_cleanly, busy_function, run_until_exit

    done = tmp_path / "round finished"
    out = run_until_exit(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from sage_fast.synthesis import BackgroundRounds, background\n"
        "from test_synthesizer import label, synthesizer, vectors_of\n"
        "plan_round = background.plan_round\n"
        + busy_function("busy", done, then="plan_round(*args, **kwargs)")  # a round that spends its time in torch
        + "background.plan_round = busy\n"
          "assert BackgroundRounds(synthesizer(), vectors_of, label, lag=3).start(4)\n")
    assert_waited_and_exited_cleanly(out, done)


class VectorStudent(torch.nn.Module):
    """A student on vectors with all three kinds of tensor a frozen copy treats apart: trained
    parameters, a frozen parameter (shared with the copy) and a buffer (copied each round)."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(D_T, 3)
        self.frozen = torch.nn.Parameter(torch.linspace(0.5, 1.5, D_T), requires_grad=False)
        self.register_buffer("scale", torch.ones(()))

    def forward(self, vectors, mask):
        keep = mask.unsqueeze(-1).to(vectors.dtype)
        return self.head((vectors * keep).sum(1) / keep.sum(1).clamp_min(1) * self.frozen) * self.scale


def boundary_synthesizer(student, calls):
    def student_forward(module, vectors, mask):
        calls.append((threading.current_thread().name, module is student))
        return module(vectors, mask)

    config = SynthesisConfig(synthetic_per_round=16, pool_size=40, n_neighbors=5, seed=3, generator="boundary",
                             boundary_steps=2)
    synth = SAGESynthesizer(config, num_examples=N, embedding_dim=DIM,
                            inputs=GeneratorInputs(student=student, student_forward=student_forward))
    embeddings, losses = planted()
    synth.observe(torch.arange(N), losses, embeddings)
    return synth


def an_optimizer_step(student):
    with torch.no_grad():
        student.head.weight.mul_(-2.0)
        student.scale.fill_(3.0)


def test_a_generator_that_reads_the_student_runs_beside_training_on_the_student_as_at_the_snapshot():
    """Boundary steps read the student, which training changes: the round reads a frozen copy taken
    at its snapshot, on the worker, so its rows are the inline round's at that step however far
    training has gone, and a checkpoint taken while it is in flight resumes to the same rows."""
    import copy

    import sage_fast

    torch.manual_seed(0)
    student = VectorStudent()
    inline = boundary_synthesizer(copy.deepcopy(student), [])
    inline.build(inline.plan(step=4), vectors_of, label)  # the student as it is at the snapshot
    calls = []
    beside = boundary_synthesizer(student, calls)
    with sage_fast.use_backend("torch"):  # the path where the worker generates (not Triton's interpreter)
        rounds = BackgroundRounds(beside, vectors_of, label, lag=2)
        assert rounds.start(4)
        an_optimizer_step(student)  # training goes on while the round is in flight
        saved = rounds.state_dict()
        record = rounds.finish()
    assert calls and all(thread != threading.current_thread().name and not live for thread, live in calls)
    assert record.synthetic == 16
    assert_same_pool(inline, beside)
    assert all(p.grad is None for p in student.parameters())
    assert set(saved["student"]) == {"head.weight", "head.bias", "scale"}  # the frozen parameter is shared

    resumed = boundary_synthesizer(copy.deepcopy(student), [])  # the student has changed since the snapshot
    again = BackgroundRounds(resumed, vectors_of, label, lag=2)
    again.load_state_dict(saved)
    again.finish()
    assert_same_pool(inline, resumed)

    older = {key: value for key, value in saved.items() if key != "student"}
    with pytest.raises(ValueError, match="reads the student as it was at the round's snapshot"):
        BackgroundRounds(boundary_synthesizer(VectorStudent(), []), vectors_of, label, lag=2).load_state_dict(older)


def test_a_frozen_copy_shares_what_does_not_train_and_refuses_another_students_state():
    from sage_fast.synthesis.generators import FrozenStudent

    student = VectorStudent()
    student.head.weight.grad = torch.ones_like(student.head.weight)
    frozen = FrozenStudent(student)
    assert frozen.module.frozen is student.frozen and frozen.module.head.weight is not student.head.weight
    assert not any(p.requires_grad for p in frozen.module.parameters()) and not frozen.module.training
    assert frozen.module.head.weight.grad is None and student.head.weight.grad is not None  # left as it was
    an_optimizer_step(student)
    assert not torch.equal(frozen.module.head.weight, student.head.weight)
    frozen.load(student)
    assert torch.equal(frozen.module.head.weight, student.head.weight) and float(frozen.module.scale) == 3.0
    with pytest.raises(ValueError, match="lacks 3 of the tensors"):
        frozen.load(torch.nn.Linear(2, 2).state_dict())
