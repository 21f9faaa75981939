"""The process's global random generators as one picklable state, per rank; no Lightning imported.

Design decisions:

- "Global" means what a model or a dataset draws from without passing a generator: torch's CPU generator
  (dropout, ``torch.randn`` in ``training_step``, augmentation in ``__getitem__``), every initialised CUDA
  device's generator, Python's ``random`` and NumPy's legacy global state. Lightning checkpoints none of them.
- The state holds tensors and plain Python values only (NumPy's key array as a tensor), so a checkpoint
  with it loads with ``torch.load(weights_only=True)``, as Lightning loads them.
- :func:`gather_states` returns every rank's state (one ``all_gather_object`` when a process group with more
  than one rank exists; every rank must call it, as Lightning does for the checkpoint's contents), so the
  checkpoint rank 0 writes holds each rank's generators: the ranks of a pipeline draw different amounts.
"""

from __future__ import annotations

import random
from typing import Any, cast

import torch
import torch.distributed as dist

__all__ = ["capture", "gather_states", "restore", "this_rank"]


def capture() -> dict[str, Any]:
    """This process's global generators: torch CPU, CUDA (each initialised device), ``random``, NumPy."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch
        return state
    name, keys, pos, has_gauss, cached = cast(tuple[str, Any, int, int, float], np.random.get_state(legacy=True))
    # plain types and a tensor only: Lightning loads checkpoints with weights_only=True
    state["numpy"] = (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    return state


def restore(state: dict[str, Any]) -> None:
    """Sets the global generators to ``state`` (from :func:`capture`); CUDA only with as many devices."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def this_rank() -> tuple[int, int]:
    """(rank, world size) of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_states() -> list[dict[str, Any]]:
    """Every rank's :func:`capture`, by rank (a collective with several processes)."""
    mine = capture()
    _, world = this_rank()
    if world == 1:
        return [mine]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, mine)
    return states
