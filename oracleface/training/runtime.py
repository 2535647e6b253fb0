"""Where a command runs: the device, the ``torchrun`` process group, the DataLoader workers,
stop signals.

Shared by the trainer and the inference commands (``eval``, ``complete``), so none of
them imports another command's module.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """This process's place in the run: ``world_size`` processes, this one ``rank``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``; ``cuda`` under
    torchrun → ``cuda:LOCAL_RANK``. Unavailable devices raise ValueError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def setup_processes(device_name: str) -> ProcessGroup:
    """Join the ``torchrun`` process group when launched by it (``WORLD_SIZE`` > 1);
    otherwise a single process. Backend: nccl on CUDA, gloo on the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank,
                                world_size=world_size, device_id=device if device.type == "cuda" else None)
    return ProcessGroup(rank, world_size, local_rank, device)


def teardown_processes(group: ProcessGroup) -> None:
    if group.distributed and dist.is_initialized():
        dist.destroy_process_group()



def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: what containers and ``taskset``
    allow), not the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


MOST_DEFAULT_WORKERS = 4


def default_workers(most: int = MOST_DEFAULT_WORKERS) -> int:
    """DataLoader workers that fit this process: its usable CPUs shared among the processes
    of this node (``LOCAL_WORLD_SIZE`` under torchrun), at most ``most``. PyTorch warns when
    a loader has more workers than the usable CPUs."""
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return min(most, usable_cpus() // processes)


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a single process (before the process group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def announce(message: str) -> None:
    """One line on stdout from rank 0 only."""
    if is_main_process():
        print(message, file=sys.stdout, flush=True)


def warn(message: str) -> None:
    """One ``oracleface train: warning:`` line on stderr from rank 0 only."""
    if is_main_process():
        print(f"oracleface train: warning: {message}", file=sys.stderr, flush=True)


class StopRequest:
    """SIGTERM / SIGINT set a flag instead of killing the process mid-step (main thread only)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user really wants out
        self.requested = True

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
