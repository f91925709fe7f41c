"""Where training runs: device choice, the ``torchrun`` process group, seeds, progress bars.

Switched by config and environment, never by code edits (docs/architecture.md, principle 7):
``device: auto`` takes CUDA when present; launched by ``torchrun`` (``WORLD_SIZE``/``LOCAL_RANK``
in the environment) the same command joins a DDP process group (nccl on CUDA, gloo on CPU).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a ``torchrun`` launch (world size 1 without one)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda: no CUDA device is available (use auto or cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def init_distributed(device: torch.device) -> tuple[torch.device, DistInfo]:
    """Join the ``torchrun`` process group when launched by it; else a world of one."""
    if "LOCAL_RANK" not in os.environ and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, DistInfo()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), True)


def close_distributed(info: DistInfo) -> None:
    """Leave the process group :func:`init_distributed` joined."""
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: the run is being stopped from outside (a KeyboardInterrupt, so that
    training records it as KILLED, not FAILED)."""


RESUME_HINT = "run the same command again to resume from the last epoch's checkpoint (last.pt)"


@contextlib.contextmanager
def stop_cleanly(info: DistInfo) -> Iterator[None]:
    """Around the epoch loop: SIGTERM raises :class:`Terminated`, and a rank of a DDP run
    that fails says so in one line before the traceback.

    torchrun stops every rank with SIGTERM when one of them dies (``docker stop``, a
    Kubernetes eviction and the Prefect flow stop a run the same way). Python's default is
    to die on the spot: the MLflow run stays RUNNING and the log says nothing. Raised as an
    exception, the stop ends the MLflow run as KILLED and the log says how to carry on. When
    a peer dies, the survivors may instead see their collective fail first (gloo: "Connection
    reset by peer"); that is reported the same way.
    """
    where = f"rank {info.rank} of {info.world_size}" if info.enabled else "training"

    def stop(signum: int, frame: object) -> None:
        why = " (torchrun stops every rank when one fails)" if info.enabled else ""
        log.error("%s: SIGTERM received%s; stopping: %s", where, why, RESUME_HINT)
        raise Terminated(f"SIGTERM received ({where})")

    # Signal handlers can only be set from the main thread (tests may train in another).
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if main else None
    try:
        yield
    except Exception as exc:
        if info.enabled:
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            log.error(
                "%s stopped on %s: %s. If another rank died first, torchrun's summary names "
                "it; once the cause is gone, %s",
                where, type(exc).__name__, first_line, RESUME_HINT,
            )  # fmt: skip
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def broadcast_values(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Rank 0's values on every rank (stop decisions must agree everywhere)."""
    if not info.enabled:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def progress_enabled() -> bool:
    """Progress bars only on an interactive terminal, never in CI."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing on CPU (where it is slower than float32 here)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Move a batch of tensors (non-blocking; pinned memory on CUDA)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def worker_context(num_workers: int) -> str | None:
    """Start DataLoader workers from a fork server: forking the trainer itself copies
    whatever threads it holds (MLflow, onnxruntime, a server in tests) into a child that may
    then die or hang; the fork server is a clean single-threaded process."""
    return "forkserver" if num_workers > 0 else None
