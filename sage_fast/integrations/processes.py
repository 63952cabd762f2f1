"""What ``SAGEDistillTrainer`` adds around the Trainer: vector inputs for models that number
positions from the padding; and under several processes: the loss's projections, which stay
out of the model the Trainer wraps (so the saved student is a standard model), start from rank 0's
and have their gradients averaged as DDP does for the student; and collectives give up on a silent
peer after the Trainer's ``ddp_timeout``."""
from __future__ import annotations

import datetime

import torch

from ..distributed import PeerLost, World
from ..nn.positions import padding_offset, position_ids


def wait_at_most(world: World, seconds: float) -> None:
    """Collectives give up on a silent peer after ``args.ddp_timeout`` seconds, as the Trainer
    documents: transformers gives the process group that timeout when it creates it, except with
    ``use_cpu=True``, where gloo would wait its default 30 minutes."""
    import torch.distributed as dist

    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)  # no public setter
    if world.distributed and set_timeout is not None and dist.get_backend() in ("gloo", "nccl"):
        set_timeout(datetime.timedelta(seconds=seconds))


def share_from_rank_zero(world: World, loss: torch.nn.Module) -> None:
    """Rank 0's projections on every rank, as DDP starts every rank from rank 0's student (each
    process built its loss with its own random state)."""
    if not world.distributed or not loss.state_dict():
        return
    state = {name: value.detach().cpu() for name, value in loss.state_dict().items()}
    loss.load_state_dict(world.broadcast_object(state))


def average_gradients(world: World, loss: torch.nn.Module) -> None:
    """The projections' gradients averaged over the ranks, as DDP averages the student's: one
    all-reduce of all of them, flattened. A projection without a gradient on a rank counts as zero
    there, so every rank issues the same collective."""
    projections = [p for p in loss.parameters() if p.requires_grad]
    if not projections:
        return
    for p in projections:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1).float() for p in projections])
    world.all_reduce_sum(flat).div_(world.size)
    for p, averaged in zip(projections, flat.split([p.numel() for p in projections])):
        p.grad.copy_(averaged.view_as(p.grad))


def peer_lost(world: World, error: BaseException, last_checkpoint, ddp_timeout: float, global_step: int) -> PeerLost:
    """What this rank says when a collective failed: where it stopped, what is kept, how to go on."""
    if last_checkpoint is None:
        kept, resume = "no checkpoint was written yet", "(there is nothing to resume from)"
    else:
        kept = f"the last checkpoint is {last_checkpoint}"
        resume = "with the script calling trainer.train(resume_from_checkpoint=True)"
    cause = str(error).strip().splitlines()
    return PeerLost(
        f"rank {world.rank}: another process of this run stopped or stopped answering (no reply within "
        f"ddp_timeout {ddp_timeout:g} s) at global step {global_step}; {kept}; see that "
        f"process's own message for why, then start the same torchrun command again {resume}. "
        f"({cause[0] if cause else type(error).__name__})")


def vector_inputs(model, vectors, mask, token_type_ids=None) -> dict:
    """Keyword arguments that feed ``model`` vectors instead of token ids. Models that number
    positions from the padding (RoBERTa, MPNet) get the position ids ``input_ids`` would give."""
    inputs = {"inputs_embeds": vectors, "attention_mask": mask}
    offset = padding_offset(model)
    if offset is not None:
        inputs["position_ids"] = position_ids(mask, offset)
    if token_type_ids is not None:
        inputs["token_type_ids"] = token_type_ids
    return inputs
