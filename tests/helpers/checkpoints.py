"""Checkpoint helpers shared by the stage-local tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import torch

from lightning_parallel.pipeline.stage_checkpoint import META_FILE


def resume_half_written(rank: int, path: str, resume: Callable[[str], Any]) -> str:
    """Copy the sharded checkpoint ``path`` without its meta file (an interrupted save), call ``resume`` on
    the copy on every rank, and return the ``ValueError`` message it raised (or ``"no error"``)."""
    broken = path.rstrip("/") + "-broken"
    if rank == 0:
        shutil.copytree(path, broken)
        os.remove(os.path.join(broken, META_FILE))
    torch.distributed.barrier()
    try:
        resume(broken)
    except ValueError as err:
        return str(err)
    return "no error"
