"""Several processes, one run: the little the core needs from ``torch.distributed``.

``torchrun`` starts one process per device and tells each its place through environment
variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). When they
are present, :func:`init` joins the process group (NCCL for CUDA devices, gloo otherwise) and
gives each process the device of its local rank. Without them nothing here does anything, so a
single-process run never touches ``torch.distributed``.

The rest is what every rank must agree on: who is rank 0 (the one that writes files and
prints), the training loss summed over ranks once per epoch, never per step (validation metrics
are torchmetrics, which sum their own states); which data each rank sees (:func:`shard`); and an
orderly goodbye (:func:`leave`), which ``minitrain run`` says after a successful run. Gradient
averaging is DDP's business (the ``ddp`` plugin).

torchrun's elastic agent restarts the whole group when a worker fails (``--max-restarts``), with
the same command line; :func:`restart_count` says which start this is, so that a restarted run
resumes from its newest checkpoint by itself (:func:`minitrain.commands.start.plan`).
"""

from __future__ import annotations

import os
import time
import weakref
from typing import Any

import torch
import torch.distributed as dist

from minitrain.engine.errors import MinitrainError

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
RESTART_ENV, MAX_RESTARTS_ENV = "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS"
"""Set by torchrun's elastic agent in every worker: the restarts of the worker group so far on
this node, and the budget (``--max-restarts``)."""
SHARED_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
"""torchrun (torch 2.5 on) hands its workers a key-value store that outlives them, and a restarted
group finds the keys the previous attempt's processes wrote there (their addresses): connecting
to them fails or hangs (pytorch/pytorch#135712). With this variable set to 1 where torchrun
starts, and c10d rendezvous (``--standalone`` or ``--rdzv-backend=c10d``; the default static
rendezvous always shares its store), rank 0 of each attempt hosts a new store instead.
``minitrain run --nproc N --max-restarts R`` sets it; :func:`check_restartable` asks for it under
a bare torchrun."""


def launched() -> bool:
    """Whether this process was started by torchrun (or anything that sets the same variables)."""
    return all(name in os.environ for name in LAUNCH_ENV)


def restart_count() -> int:
    """How many times torchrun has restarted this node's worker group before this start (0 on the
    first start, and outside torchrun). Each node's agent counts its own: a node whose workers were
    restarted because another node's failed may count fewer, so :func:`minitrain.commands.start.plan` takes
    the largest over ranks."""
    return int(os.environ.get(RESTART_ENV, "0") or 0) if launched() else 0


def max_restarts() -> int:
    """torchrun's ``--max-restarts`` for this run (0 outside torchrun)."""
    return int(os.environ.get(MAX_RESTARTS_ENV, "0") or 0) if launched() else 0


def check_restartable() -> None:
    """Refuse, before any work, a torchrun launch with ``--max-restarts`` whose restarts could not
    join a process group (see :data:`SHARED_STORE_ENV`): better one line now than a hang after
    the first failure."""
    if max_restarts() and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise MinitrainError(
            f"torchrun --max-restarts: a restarted group could not connect, as torchrun shares its "
            f"store with the workers and keeps the last attempt's keys in it; set "
            f"{SHARED_STORE_ENV}=1 where torchrun starts (on every node), with c10d rendezvous "
            "(--standalone or --rdzv-backend=c10d)"
        )


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the process that writes the run's files and prints its progress."""
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group, if launched by it, and return this process's device:
    ``cuda:LOCAL_RANK`` when ``device`` is CUDA, ``device`` itself otherwise."""
    if not launched() or active():
        return device
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise MinitrainError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                "here: start at most one process per GPU (--nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    except (RuntimeError, ValueError) as exc:
        raise MinitrainError(f"could not join the process group ({backend}): {exc}") from None
    return device


def leave() -> None:
    """Close the process group once the run has succeeded, on every rank. A final all-reduce
    waits until all ranks are done; then this process waits until gloo's worker thread has let
    go of that collective's tensor, because a worker still releasing a tensor once Python has
    begun shutting down aborts the process (DDP keeps the group alive until then). A failing
    run skips this: torchrun stops the other processes when one fails."""
    if not active():
        return
    marker = torch.zeros(1, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(marker)
    released, deadline = weakref.ref(marker), time.monotonic() + 10
    del marker
    while released() is not None and time.monotonic() < deadline:
        time.sleep(0.001)
    dist.destroy_process_group()


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` summed over all ranks (``tensor`` itself when there is one rank).
    Every rank must call it, in the same order: it is a collective."""
    if not active():
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total


def gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank (``[value]`` with one process). A
    collective, for small picklable values such as a stop request's reason."""
    if not active():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    """Wait until every rank gets here (nothing with one process): e.g. until rank 0 has finished
    writing a checkpoint that the others must not run ahead of."""
    if active():
        dist.barrier()


def from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a path, a run directory name): for choices that all
    ranks must make alike but only one should make."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class RankShard(torch.utils.data.Sampler):
    """Every ``world_size``-th index from this rank's on, in order and without padding: each sample
    is validated exactly once over all ranks (``DistributedSampler`` pads to equal lengths)."""

    def __init__(self, dataset):
        self.indices = range(rank(), len(dataset), world_size())

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def shard(loader: Any, train: bool, seed: int = 0) -> Any:
    """Under torchrun, a recipe's plain ``DataLoader`` (default sampler) that would give every
    rank the whole data set, rebuilt to give each rank its share: a ``DistributedSampler`` for
    training (shuffled if the loader was; the trainer calls its ``set_epoch``), :class:`RankShard`
    for validation. A loader minitrain cannot rebuild (a sampler of its own, an iterable data set)
    is returned as it is, with a warning. Anything else, and everything in one process, is
    returned unchanged."""
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

    if world_size() == 1 or type(loader) is not DataLoader:
        return loader
    sampler = loader.sampler
    if isinstance(sampler, (DistributedSampler, RankShard)):
        return loader
    which = "train_loader" if train else "val_loader"
    if type(sampler) not in (RandomSampler, SequentialSampler) or loader.batch_size is None:
        if is_main():
            import warnings

            warnings.warn(
                f"{which}: a DataLoader with a sampler of its own gives every one of the {world_size()} "
                "ranks the whole data set; give it a DistributedSampler to shard it",
                stacklevel=3,
            )
        return loader
    shuffle = isinstance(sampler, RandomSampler)
    sampler = (
        DistributedSampler(loader.dataset, world_size(), rank(), shuffle=shuffle, seed=seed)
        if train
        else RankShard(loader.dataset)
    )
    options = {
        key: getattr(loader, key)
        for key in (
            "num_workers",
            "collate_fn",
            "pin_memory",
            "drop_last",
            "timeout",
            "worker_init_fn",
            "multiprocessing_context",
            "generator",
            "persistent_workers",
            "pin_memory_device",
        )
    }
    if loader.num_workers:
        options["prefetch_factor"] = loader.prefetch_factor
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, **options)
