"""`sage-fast distill` under real `torchrun`: two CPU processes (gloo) on a tiny model.

(a) Two processes train the student one process trains when it deals each step out to two
    micro-batches (`--grad-accumulation 2`): the same rows in the same parts, so the same numbers.
(b) Every rank holds the same synthetic pool (checked at the component's level in
    tests/synthesis/test_distributed_synthesizer.py; here: the pool rank 0 saved is the one-process pool).
(c) A run stopped by SIGTERM under torchrun and resumed under torchrun ends where the uninterrupted
    run ends.
(d) A rank that is killed makes the other stop with a message, well within --dist-timeout.
"""
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("umap")

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import make_tiny_task  # noqa: E402
from torchrun_fixtures import LAUNCH_LIMIT, finish, launch, rank_pids, run_to_end, torchrun, wait_for  # noqa: E402

from sage_fast.distributed import DistributedError, World  # noqa: E402
from sage_fast.train import checkpoint, loop  # noqa: E402
from sage_fast.train.config import DistillConfig  # noqa: E402

TIMEOUT = 20  # --dist-timeout of these runs: seconds before a silent peer counts as lost
EXIT_ABORT = "terminate called without an active exception"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_task(tmp_path_factory.mktemp("tiny"), dropout=0.0)


def flags(tiny, out, *extra):
    # eval-batch-size 8: one process labels a round's 16 synthetic rows in two forwards of 8, as
    # two ranks each label their 8, so the teacher's labels are the same numbers too
    return ["distill", "--teacher", str(tiny / "teacher"), "--student", "from-teacher:2",
            "--train-file", str(tiny / "data.csv"), "--epochs", "3", "--batch-size", "16", "--max-length", "16",
            "--analysis-every", "6", "--synthetic-per-round", "16", "--pool-size", "32", "--synthetic-per-batch", "4",
            "--n-neighbors", "5", "--eval-batch-size", "8", "--log-every", "1", "--compare", "kd", "--no-progress",
            "--device", "cpu", "--dist-timeout", str(TIMEOUT), "--output-dir", str(out),
            "--cache-dir", str(tiny / "cache"), *extra]


def torchrun_command(args, nproc=2):
    return torchrun(["-m", "sage_fast.cli", *args], nproc)


def students(out: Path) -> dict:
    return {mode: checkpoint.load(out / mode)["student"] for mode in ("sage", "kd")}


def records(out: Path, mode: str) -> list[dict]:
    lines = (out / mode / "metrics.jsonl").read_text().splitlines()
    keep = ("kind", "step", "epoch", "accuracy", "round", "synthetic", "pool", "threshold", "loss")
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, lines) if r["kind"] != "train"] + \
           [{"loss": round(r["loss"], 5), "step": r["step"]} for r in map(json.loads, lines) if r["kind"] == "train"]


def assert_same_students(a: dict, b: dict, atol: float):
    for mode in ("sage", "kd"):
        assert a[mode].keys() == b[mode].keys()
        for name, value in a[mode].items():
            torch.testing.assert_close(value, b[mode][name], atol=atol, rtol=0, msg=f"{mode}: {name}")


@pytest.fixture(scope="module")
def two_processes(tiny):
    out = tiny / "two"
    stdout, _ = run_to_end(torchrun_command(flags(tiny, out)))
    return out, stdout


@pytest.fixture(scope="module")
def one_process(tiny):
    out = tiny / "one"
    run_to_end([sys.executable, "-m", "sage_fast.cli", *flags(tiny, out, "--grad-accumulation", "2")])
    return out


def test_two_processes_train_what_one_process_trains_with_two_micro_batches(two_processes, one_process):
    two, stdout = two_processes
    assert stdout.count("val acc") == 1 and stdout.count("[sage] test accuracy") == 1, "rank 0 alone logs and prints"
    assert_same_students(students(two), students(one_process), atol=1e-6)
    for mode in ("sage", "kd"):
        assert records(two, mode) == records(one_process, mode)
    analysis = [r for r in records(two, "sage") if r.get("kind") == "analysis"]
    assert len(analysis) >= 2 and all(r["synthetic"] == 16 for r in analysis)
    # every rank holds the same pool; rank 0 saved it, and it is the one-process pool
    pool_two = checkpoint.load(two / "sage")["synthesizer"]["pool"]
    pool_one = checkpoint.load(one_process / "sage")["synthesizer"]["pool"]
    for key, value in pool_one.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(pool_two[key], value, atol=1e-6, rtol=0, msg=key)


def test_boundary_rounds_made_beside_training_are_the_one_process_rounds(tiny):
    """Boundary steps read each rank's frozen copy of its student, taken at the round's snapshot
    (DDP keeps the students equal), beside training: two processes end with the pool and the
    student of one process that deals each step out to two micro-batches."""
    extra = ("--generator", "boundary", "--boundary-steps", "2", "--analysis-lag", "2")

    def sage_only(args):
        at = args.index("--compare")
        return args[:at] + args[at + 2:]

    two, one = tiny / "two-boundary", tiny / "one-boundary"
    code, out, err = finish(launch(torchrun_command(sage_only(flags(tiny, two, *extra)))))
    if code != 0:
        # Known and open: once in several runs, a rank that stepped boundary rows on a worker thread
        # aborts as the interpreter exits ("terminate called without an active exception"), after
        # the run has written everything. Only that abort, after a finished run, is let through
        # here; what the run wrote is still checked below.
        assert EXIT_ABORT in err and (two / "results.json").is_file(), f"exit {code}\n{out[-3000:]}\n{err[-3000:]}"
        warnings.warn(f"a rank aborted at exit after a finished boundary run: {EXIT_ABORT!r}")
    run_to_end([sys.executable, "-m", "sage_fast.cli", *sage_only(flags(tiny, one, "--grad-accumulation", "2", *extra))])
    a, b = checkpoint.load(two / "sage"), checkpoint.load(one / "sage")
    for name, value in b["student"].items():
        torch.testing.assert_close(a["student"][name], value, atol=1e-6, rtol=0, msg=name)
    for key, value in b["synthesizer"]["pool"].items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(a["synthesizer"]["pool"][key], value, atol=1e-6, rtol=0, msg=key)
    analysis = [r for r in records(two, "sage") if r.get("kind") == "analysis"]
    assert len(analysis) >= 2 and all(r["synthetic"] == 16 for r in analysis)


def test_a_run_stopped_by_sigterm_resumes_under_torchrun_to_the_same_end(tiny, two_processes):
    out = tiny / "stopped"
    process = launch(torchrun_command(flags(tiny, out)))
    wait_for(out / "sage" / checkpoint.CHECKPOINT_NAME, process)  # the end of the first epoch
    process.send_signal(signal.SIGTERM)  # to torchrun, which passes it to every rank, as a scheduler would
    code, _, err = finish(process)
    assert code != 0 and "Resume with" in err, err[-3000:]
    stopped_at = checkpoint.load(out / "sage")["global_step"]
    total = checkpoint.load(out / "sage")["total_steps"]
    assert 0 < stopped_at < total
    state = checkpoint.load(out / "sage")
    assert state["world_size"] == 2 and len(state["rank_rng"]) == 2
    run_to_end(torchrun_command(flags(tiny, out, "--resume")))
    two, _ = two_processes
    assert_same_students(students(out), students(two), atol=1e-6)
    assert records(out, "sage") == records(two, "sage")


def test_a_checkpoint_of_two_processes_is_refused_by_one(tiny, two_processes):
    two, _ = two_processes
    code, _, err = finish(launch([sys.executable, "-m", "sage_fast.cli", *flags(tiny, two, "--resume",
                                                                               "--epochs", "4")]))
    assert code == 2 and "2 process(es)" in err and "Traceback" not in err, err[-2000:]


def test_a_killed_rank_ends_the_other_with_a_message(tiny):
    out = tiny / "killed"
    started = time.monotonic()
    process = launch(torchrun_command(flags(tiny, out, "--epochs", "30")))
    wait_for(out / "sage" / checkpoint.CHECKPOINT_NAME, process)
    os.kill(rank_pids(process.pid)[1], signal.SIGKILL)
    killed = time.monotonic()
    code, _, err = finish(process, limit=TIMEOUT + 60)
    assert code != 0
    assert time.monotonic() - killed < TIMEOUT + 30, "the surviving rank outlived the collective timeout"
    assert "another process of this run stopped" in err, err[-3000:]
    assert time.monotonic() - started < LAUNCH_LIMIT


def test_each_process_takes_its_local_gpu_and_a_fixed_one_is_refused():
    world = World(rank=1, size=2, local_rank=1)
    assert loop.rank_device(DistillConfig(device="cpu"), world).type == "cpu"
    with pytest.raises(DistributedError, match="LOCAL_RANK"):
        loop.rank_device(DistillConfig(device="cuda:0"), world)
    if not torch.cuda.is_available():
        assert loop.rank_device(DistillConfig(device="auto"), world).type == "cpu"


def test_a_step_is_dealt_out_in_parts_every_process_can_count():
    assert loop.part_sizes(16, 4) == [4, 4, 4, 4]
    assert loop.part_sizes(7, 2) == [4, 3]
    rows = list(range(7))
    assert [len(rows[j::2]) for j in range(2)] == loop.part_sizes(7, 2)
