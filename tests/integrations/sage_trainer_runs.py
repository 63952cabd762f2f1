"""The runs tests/integrations/test_hf_trainer_distributed.py compares, as a script.

    python -m torch.distributed.run --standalone --nproc-per-node 2 sage_trainer_runs.py OUT
        two processes: a straight run that saves a checkpoint at step 3, then a run resumed from it;
    python sage_trainer_runs.py OUT
        one process with gradient_accumulation_steps=2: the same global batch, dealt out as two
        processes deal it (rank r's batch is micro-batch r), so the same numbers by construction;
    python -m torch.distributed.run --standalone --nproc-per-node 2 sage_trainer_runs.py OUT killed
        two processes on a run far longer than the test lets it go (it kills rank 1 once a
        checkpoint is written), with a short ddp_timeout; nothing is recorded.

Each process writes ``OUT/<run>-rank<r>.pt``: its student, loss projections, synthesizer state and
counts after training, and how often it wrote SAGE's state file.

The student is a tiny ALBERT: its input table has the teacher's width (16), which synthesis needs,
while its hidden states are narrower (8), so the loss owns projections as well. Its dropout is 0
(the teacher always runs in eval mode), so no run depends on a process's random state.
"""
import signal
import sys
import weakref
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from test_hf_trainer import LENGTH, VOCAB, sage_trainer, tiny_bert  # noqa: E402

from sage_fast.distributed import launched_world  # noqa: E402
from sage_fast.nn.sage_loss import SAGELoss, SAGELossConfig  # noqa: E402

PER_DEVICE = 4  # two processes x 4 rows, or one process x 2 micro-batches x 4 rows: 8 rows a step
SAVE_AT = 3
KILLED_TIMEOUT = 20  # ddp_timeout of the killed run: seconds before a silent peer counts as lost


def tiny_albert(seed):
    torch.manual_seed(seed)
    config = transformers.AlbertConfig(
        vocab_size=VOCAB, embedding_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=LENGTH, num_labels=2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0)
    return transformers.AlbertForSequenceClassification(config)


def trainer(out: Path, rank: int, **args):
    # Each rank starts its projections from its own random state: the trainer must give every rank
    # rank 0's, as DDP does for the student (the one-process run uses rank 0's).
    torch.manual_seed(100 + rank)
    loss = SAGELoss(SAGELossConfig(beta=0.5, cosine_weight=0.5, layer_map={1: 2}, num_student_layers=1,
                                   num_teacher_layers=2, student_hidden_size=8, teacher_hidden_size=16))
    made = sage_trainer(out, teacher=tiny_bert(16, 2, seed=0), student=tiny_albert(seed=1), loss=loss,
                        per_device_train_batch_size=PER_DEVICE, save_strategy="steps", save_steps=SAVE_AT, **args)
    made.state_files_written = 0
    save, counted = type(made).save_sage_state, weakref.ref(made)  # no cycle: made is freed when unnamed

    def counting_save(folder):
        counted().state_files_written += 1
        return save(counted(), folder)

    made.save_sage_state = counting_save
    return made


def record(made, path: Path):
    synthesizer = made.synthesizer
    torch.save({"student": {k: v.detach().clone() for k, v in made.model.state_dict().items()},
                "projections": {k: v.detach().clone() for k, v in made.sage_loss.state_dict().items()},
                "synthesizer": synthesizer.state_dict(), "rounds": [r.round for r in made.sage_rounds],
                "examples_seen": dict(made.sage_examples_seen), "state_files_written": made.state_files_written,
                "world_size": made.world.size}, path)


def run_until_killed(out: Path, rank: int):
    # torchrun's agent sends SIGTERM to the other workers as soon as it sees one die, which could end
    # rank 0 before its next collective fails. Ignoring it makes rank 0 what a rank on another machine
    # is (no agent there sees the death), so the test reads what the trainer itself says.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A checkpoint every SAVE_AT steps, the last two kept.
    killed = trainer(out / "killed", rank, max_steps=100_000, ddp_timeout=KILLED_TIMEOUT, save_total_limit=2)
    killed.train()


def main(out: Path, scenario: str | None = None):
    world = launched_world()  # what torchrun's environment says; the Trainer joins the process group
    try:
        run(out, world, scenario)
    finally:
        # What every torchrun script must do, once its trainers are freed (run's locals, no cycles):
        # a process that exits with a gloo group alive can abort at exit ("terminate called
        # without an active exception") after its work is done.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run(out: Path, world, scenario: str | None):
    if scenario == "killed":
        run_until_killed(out, world.rank)
    elif world.distributed:
        straight = trainer(out / "straight", world.rank)
        straight.train()
        record(straight, out / f"straight-rank{world.rank}.pt")
        resumed = trainer(out / "resumed", world.rank)
        resumed.train(resume_from_checkpoint=str(out / "straight" / f"checkpoint-{SAVE_AT}"))
        record(resumed, out / f"resumed-rank{world.rank}.pt")
    else:
        one = trainer(out / "one", 0, gradient_accumulation_steps=2)
        one.train()
        record(one, out / "one-rank0.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
