"""Several processes (``torchrun``): who this process is, and the few collectives SAGE needs.

A :class:`World` is this process's rank among ``size`` processes. ``World()`` (rank 0 of 1) is the
one-process case, where every collective returns its input and nothing touches
``torch.distributed``: the library and the driver take a world everywhere and behave exactly as
before when it is the single one.

What crosses the network, by design (see docs/scaling.md):

- every optimizer step, DDP's gradients, and each rank's real rows' ids, per-example losses and
  pooled embeddings (``all_gather_rows``), so every rank keeps the same error profile and runs the
  same deterministic analysis: no plan has to be sent;
- every analysis round, the teacher's logits (and hidden states when the alignment term is on) on
  each rank's share of the synthetic rows. Token vectors never do: each rank interpolates every
  synthetic row itself from its own copy of the training data.

Sizes are known on the host by every rank (they follow from the global batch and the world size),
so no collective here reads a device value back: on CUDA with NCCL the step never waits on the host.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch

from .errors import UsageError

#: Seconds a collective waits for the other ranks before this process gives up (a rank that died
#: makes the others stop with a message within this time instead of hanging).
DEFAULT_TIMEOUT = 300.0


class DistributedError(UsageError):
    """torchrun's environment asks for something this run cannot do (the wrong backend, a batch
    that does not split over the ranks, a checkpoint of another world size)."""


class PeerLost(RuntimeError):
    """A collective failed or timed out: another process of the run stopped. The message says which
    step this rank had reached and what to do."""


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes (``rank`` of ``size``; ``local_rank`` on its
    machine, which picks its GPU)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files, logs, progress bars and pictures."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    # ------------------------------------------------------------------ shares
    def share(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items: the first ``n % size`` ranks take one more."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def share_sizes(self, n: int) -> list[int]:
        return split_sizes(n, self.size)

    # ------------------------------------------------------------------ collectives
    def all_gather_rows(self, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every rank's ``tensor`` (rank ``r`` holds ``sizes[r]`` rows) joined in rank order, on
        every rank. ``sizes`` must be known to all ranks on the host: uneven shares are padded to the
        largest and trimmed after, so nothing is read back from the device."""
        if not self.distributed:
            return tensor
        if tensor.shape[0] != sizes[self.rank]:
            raise ValueError(f"rank {self.rank} holds {tensor.shape[0]} rows but sizes says {sizes[self.rank]}")
        import torch.distributed as dist

        largest = max(sizes)
        padded = tensor
        if tensor.shape[0] < largest:
            padded = torch.cat([tensor, tensor.new_zeros((largest - tensor.shape[0], *tensor.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks (in place, and returned)."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def row_counts(self, rows: int) -> list[int]:
        """Every rank's ``rows``, in rank order, for when the counts do not follow from what every
        rank knows. Host numbers go over a CPU (gloo) group, so the host waits for the other
        ranks' hosts but never for the device: under NCCL a device gather would have made every
        step wait for its GPU work before reading the counts back."""
        if not self.distributed:
            return [rows]
        import torch.distributed as dist

        counts = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(counts, torch.tensor([rows], dtype=torch.int64), group=_host_group())
        return [int(count) for count in counts]

    def any(self, flag: bool, device: torch.device | str = "cpu") -> bool:
        """Whether any rank's ``flag`` is true (a host read: call it where the host waits anyway)."""
        if not self.distributed:
            return bool(flag)
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        return bool(self.all_reduce_sum(value).item() > 0)

    def all_gather_objects(self, obj) -> list:
        """Every rank's picklable ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        """Rank ``src``'s ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (fills a cache, fine-tunes a teacher), the others then run
        it too and find its results: no two processes write one file at once."""
        if self.is_main:
            try:
                yield
            finally:
                self.barrier()
        else:
            self.barrier()
            yield


SINGLE = World()


def split_sizes(n: int, parts: int) -> list[int]:
    """Sizes of ``n`` items dealt into ``parts`` as evenly as they go, the first ``n % parts`` parts
    one larger: the contiguous shares of ``World.share`` and the strided parts ``rows[j::parts]``
    alike."""
    base, extra = divmod(n, parts)
    return [base + (j < extra) for j in range(parts)]


def collective_failed(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another rank is gone (its connections
    closed) or too slow (the collective timed out), rather than a fault of this process."""
    dist_error = getattr(torch.distributed, "DistError", ())
    if dist_error and isinstance(error, dist_error):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        word in text for word in ("Gloo", "gloo", "NCCL", "Connection closed", "Connection reset", "timed out",
                                  "Timed out", "peer"))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"the environment variable {name} must be an integer (torchrun sets it), "
                               f"got {value!r}") from None


def launched_world() -> World:
    """The world torchrun describes in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``),
    or the single process when it describes none. Starts nothing."""
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise DistributedError(f"RANK {rank} and WORLD_SIZE {size} do not describe a process of a run")
    return World(rank=rank, size=size, local_rank=_env_int("LOCAL_RANK", rank))


def current_world() -> World:
    """The world of an initialised default process group (a ``transformers.Trainer`` under
    ``torchrun`` or ``accelerate launch`` has one), else the single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return World(rank=dist.get_rank(), size=dist.get_world_size(),
                     local_rank=_env_int("LOCAL_RANK", dist.get_rank()))
    return SINGLE


def init_world(device: torch.device, *, timeout: float = DEFAULT_TIMEOUT) -> World:
    """Join the run torchrun started (NCCL on CUDA devices, gloo on the CPU), or return the single
    process when there is none. ``device`` must already be this rank's device."""
    world = launched_world()
    if not world.distributed:
        return world
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError("this torch was built without torch.distributed, so it cannot run under torchrun")
    if dist.is_initialized():
        return current_world()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout),
                            **({"device_id": device} if device.type == "cuda" else {}))
    return world


_host_groups: list = []  # [(default group, its CPU twin)]: one twin per default group


def _host_group():
    """A gloo group over the default group's ranks, for numbers that live on the host: None (the
    default group itself) when that is gloo already. Made on first use, which every rank reaches
    in the same collective call, and again for a new default group."""
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None
    default = dist.group.WORLD
    if not _host_groups or _host_groups[0][0] is not default:
        _host_groups[:] = [(default, dist.new_group(backend="gloo"))]
    return _host_groups[0][1]


def close_world(world: World) -> None:
    """Leave the process group (once the run is over, on every rank)."""
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["DEFAULT_TIMEOUT", "DistributedError", "PeerLost", "SINGLE", "World", "split_sizes", "close_world", "collective_failed",
           "current_world", "init_world", "launched_world"]
