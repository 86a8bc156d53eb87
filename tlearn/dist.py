"""Data-parallel runs on PyTorch's own engine: which process this is, and the few collectives tlearn needs.

tlearn does not supervise processes. A launcher does: ``torchrun --nproc_per_node N -m tlearn train ...``,
``accelerate launch --multi_gpu --num_processes N -m tlearn train ...``, or ``tlearn train --devices N``, which
runs torchrun's launcher (``launch``).
The launcher sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; ``init`` joins that process
group (NCCL on GPUs, one process per GPU; gloo on CPUs) and everything else here is a thin name for a
``torch.distributed`` call. With one process every function is a no-op, so the single-process path is unchanged.
If a process dies, the launcher stops the others; the collectives also give up after ``TIMEOUT`` seconds, so no
process waits forever.

This module imports nothing of tlearn, and PyTorch only where a function needs it (which process this is can be
asked without it).
"""

from __future__ import annotations

import datetime
import gc
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
TIMEOUT = int(os.environ.get("TLEARN_DIST_TIMEOUT", "600"))  # seconds a collective waits for the other processes


_left = False  # set by ``finish``: this process now works alone


def world_size() -> int:
    return 1 if _left else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def active() -> bool:
    """Whether this process is one of several (a launcher started it with WORLD_SIZE above 1)."""
    return world_size() > 1


def is_main() -> bool:
    """Rank 0: the one process that writes files, logs and progress bars."""
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join the launcher's process group (once) and return the device this process trains on: ``cuda:LOCAL_RANK``
    on GPUs, else ``device``."""
    import torch
    import torch.distributed as td

    if not active():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not td.is_initialized():
        td.init_process_group("nccl" if device.type == "cuda" else "gloo",
                              timeout=datetime.timedelta(seconds=TIMEOUT))
    return device


def shard(items: Sequence[T]) -> list[T]:
    """This process's share of ``items``: every ``world_size``-th one from ``rank``. The shares are disjoint and
    together cover ``items``."""
    return list(items[rank()::world_size()])


def owns(key: str) -> bool:
    """Whether this process owns ``key``, a hex digest: keys are dealt out by their value, so every process
    agrees on the owner without asking the others, whatever each has already seen."""
    return int(key[:12], 16) % world_size() == rank()


def barrier() -> None:
    """Wait until every process gets here."""
    import torch.distributed as td

    if td.is_initialized():
        td.barrier()


def all_sum(values: Sequence[float]) -> list[float]:
    """Each value summed over the processes (in float64, on the CPU or the process's GPU)."""
    import torch
    import torch.distributed as td

    if not td.is_initialized():
        return [float(v) for v in values]
    device = torch.device("cuda", torch.cuda.current_device()) if td.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    td.all_reduce(t)
    return t.cpu().tolist()


def gather(t: torch.Tensor) -> list[torch.Tensor]:
    """``t`` (the same shape and dtype on every process) from every process, in rank order, on every process."""
    import torch
    import torch.distributed as td

    if not td.is_initialized():
        return [t]
    device = torch.device("cuda", torch.cuda.current_device()) if td.get_backend() == "nccl" else torch.device("cpu")
    parts = [torch.empty_like(t, device=device) for _ in range(world_size())]
    td.all_gather(parts, t.to(device))
    return [p.cpu() for p in parts]


def lost_peer(e: BaseException) -> bool:
    """Whether ``e`` is a collective failing because another process stopped (its connection closed), as gloo
    and NCCL report it."""
    import torch.distributed as td

    text = str(e).lower()
    return td.is_initialized() and isinstance(e, RuntimeError) and \
        any(word in text for word in ("connection reset", "connection closed", "gloo", "nccl", "timed out"))


def finish() -> None:
    """Leave the process group, every process together (at the end of training, after which rank 0 evaluates
    and writes alone)."""
    import torch.distributed as td

    global _left
    if td.is_initialized():
        gc.collect()  # a DistributedDataParallel wrapper no longer used still holds work of the group: free it first
        td.barrier()
        td.destroy_process_group()
        _left = True


class ProcessFailed(RuntimeError):
    """One process of a launched group stopped: ``rank`` first, ``how`` (a signal or an exit status)."""

    def __init__(self, rank: int, how: str):
        super().__init__(f"process {rank} stopped ({how})")
        self.rank, self.how = rank, how


def launch(n: int, argv: Sequence[str], threads: int) -> None:
    """Run ``python -m tlearn ARGV`` as ``n`` processes under PyTorch's elastic launcher (what ``torchrun
    --standalone --nproc-per-node N`` runs), each with ``threads`` intra-op threads. If one fails, the launcher
    stops the others, and ``ProcessFailed`` names the one that failed first (not those it then stopped)."""
    import logging
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, threads)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its failures are summarised here
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2)
    try:
        elastic_launch(config, sys.executable)("-m", "tlearn", *argv)
    except ChildFailedError as e:
        (first, failure), *_ = sorted(e.failures.items(), key=lambda item: (item[1].signal_name() == "SIGTERM",
                                                                           item[1].timestamp, item[0]))
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit status {failure.exitcode}"
        raise ProcessFailed(first, how) from None
