"""SAGEDistillTrainer under real `torchrun`: two CPU processes (gloo) on a tiny teacher and student,
with synthesis and learned loss projections (the runs are in sage_trainer_runs.py).

(a) Every rank ends with the same student, projections and synthesizer, although each rank built
    its projections from its own random state and trained on its own rows.
(b) Two processes train what one process trains with gradient_accumulation_steps=2: the same rows
    in the same micro-batches, the same synthetic rows in each, the same rounds.
(c) A run resumed under torchrun from a checkpoint ends where the uninterrupted run ends.
(d) Rank 0 alone writes SAGE's state file into a checkpoint, whose student is a standard model.
(e) A rank killed mid-training makes the other end with a message that says how to resume, well
    within ddp_timeout, instead of hanging.
"""
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("umap")

sys.path.insert(0, str(Path(__file__).parent))
from sage_trainer_runs import KILLED_TIMEOUT, SAVE_AT  # noqa: E402
from torchrun_fixtures import LAUNCH_LIMIT, finish, kill_run, launch, rank_pids, torchrun, wait_for  # noqa: E402

from sage_fast.integrations.hf_trainer import STATE_FILE  # noqa: E402

RUNS = Path(__file__).with_name("sage_trainer_runs.py")
EXPECTED_SEEN = {"real": 48, "synthetic": 16}  # 6 steps of 8 rows; 4 synthetic rows a step after the first round


def run_script(command: list[str]) -> None:
    """Run ``command`` to its end; past LAUNCH_LIMIT it is killed, torchrun's workers too."""
    code, out, err = finish(launch(command), limit=LAUNCH_LIMIT)
    assert code == 0, f"{command} exited {code}:\n{out[-2000:]}\n{err[-4000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each run's result per rank: two processes (a straight run, then a run resumed from its
    step-3 checkpoint) and one process with two micro-batches a step."""
    out = tmp_path_factory.mktemp("runs")
    run_script(torchrun([str(RUNS), str(out)]))
    run_script([sys.executable, str(RUNS), str(out)])
    results = {name: [torch.load(out / f"{name}-rank{r}.pt", weights_only=False) for r in range(ranks)]
               for name, ranks in (("straight", 2), ("resumed", 2), ("one", 1))}
    results["out"] = out
    return results


def tensors(state: dict, prefix: str = "") -> dict:
    """Every tensor of a run's nested state (student, projections, synthesizer), by its path."""
    found = {}
    for key, value in state.items():
        if isinstance(value, dict):
            found.update(tensors(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            found[f"{prefix}{key}"] = value
    return found


def trained(result: dict) -> dict:
    return tensors({key: result[key] for key in ("student", "projections", "synthesizer")})


def test_every_rank_ends_with_the_same_student_projections_and_pool(runs):
    for name in ("straight", "resumed"):
        first, second = runs[name]
        assert first["world_size"] == second["world_size"] == 2
        assert first["projections"], "the hidden sizes differ, so the loss owns projections"
        assert first["synthesizer"]["pool"]["size"] == 16
        torch.testing.assert_close(trained(second), trained(first), rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        assert first["examples_seen"] == second["examples_seen"] == EXPECTED_SEEN


def test_two_processes_train_what_one_process_trains_in_two_micro_batches(runs):
    two, (one,) = runs["straight"][0], runs["one"]
    assert one["world_size"] == 1
    assert two["rounds"] == one["rounds"] == [1, 2]
    # The same numbers by construction (each micro-batch computes what one rank computes, and the
    # mean of two gradients is the sum of two halves); the tolerance only allows a backend that
    # sums in another order.
    torch.testing.assert_close(trained(two), trained(one), rtol=1e-6, atol=1e-7)
    assert two["examples_seen"] == one["examples_seen"] == EXPECTED_SEEN


def test_a_run_resumed_under_torchrun_ends_where_the_straight_run_ends(runs):
    for straight, resumed in zip(runs["straight"], runs["resumed"]):
        assert resumed["rounds"] == [2]  # round 1 came back from the checkpoint
        torch.testing.assert_close(trained(resumed), trained(straight), rtol=0, atol=0)
        assert resumed["examples_seen"] == straight["examples_seen"]


def test_rank_zero_alone_writes_sage_state_and_the_saved_student_is_a_standard_model(runs):
    # checkpoints at steps 3 and 6 in the straight run, 6 in the resumed one
    assert [r["state_files_written"] for r in runs["straight"]] == [2, 0]
    assert [r["state_files_written"] for r in runs["resumed"]] == [1, 0]
    checkpoint = runs["out"] / "straight" / "checkpoint-6"
    assert (checkpoint / STATE_FILE).is_file()
    student, info = transformers.AlbertForSequenceClassification.from_pretrained(checkpoint, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    final = runs["straight"][0]["student"]
    for name, value in student.state_dict().items():
        assert torch.equal(value, final[name]), name


def test_a_killed_rank_ends_the_other_with_a_message_naming_the_checkpoint(tmp_path):
    process = launch(torchrun([str(RUNS), str(tmp_path), "killed"]))
    try:
        wait_for(tmp_path / "killed" / f"checkpoint-{SAVE_AT}" / STATE_FILE, process, limit=LAUNCH_LIMIT)
        os.kill(rank_pids(process.pid)[1], signal.SIGKILL)
        killed = time.monotonic()
        code, _, err = finish(process, limit=KILLED_TIMEOUT + 60)
        lasted = time.monotonic() - killed
    finally:
        if process.poll() is None:  # a failed wait: end the run, workers and all
            kill_run(process)
            process.communicate()
    assert code != 0
    assert lasted < KILLED_TIMEOUT + 30, "the surviving rank outlived the collective timeout"
    said = re.search(r"rank 0: another process of this run stopped or stopped answering .*? at global step (\d+); "
                     r"the last checkpoint is (\S+);", err)
    assert said, err[-3000:]
    step, folder = int(said[1]), Path(said[2])
    # The checkpoint named is the newest one rank 0 wrote whole, one a resumed run can start from.
    assert folder.parent == tmp_path / "killed" and (folder / STATE_FILE).is_file(), folder
    assert SAVE_AT <= int(folder.name.rsplit("-", 1)[1]) <= step
    assert "trainer.train(resume_from_checkpoint=True)" in err
