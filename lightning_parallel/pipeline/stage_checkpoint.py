"""Sharded checkpoints of stage-local weights through ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a directory. Each rank writes only the tensors it holds, under flat keys built from the
module's own state-dict names, so that any layout can read any other layout's checkpoint (resharding):

- ``model/<name>``: a parameter or buffer, e.g. ``model/blocks.3.attn.qkv.weight``;
- ``optimizer/<i>/<name>/<key>``: entry ``key`` (``exp_avg``, ``step``, ...) of optimizer ``i``'s state of
  the parameter called ``<name>``.

Tensors held by several ranks (Chimera's second copy of a stage, tied parameters, data-parallel replicas)
are equal and written once (DCP keeps one writer per key). Everything else, the non-tensor part of a
Lightning checkpoint (loops, callbacks, hyper-parameters, the pipeline's shape) and each optimizer's param
groups with their parameters' names in order, goes into :data:`META_FILE`, written by global rank 0 after
every shard and DCP's own ``.metadata`` are complete: a directory without both is an interrupted save and
is refused by :func:`check_complete`.

This module imports no Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.optim import Optimizer

META_FILE = "pipeline_meta.pt"
DCP_METADATA = ".metadata"
MODEL_PREFIX = "model/"
OPTIMIZER_PREFIX = "optimizer/"


def parameter_names(module: nn.Module) -> dict[int, str]:
    """id(parameter) -> its first name in ``module.named_parameters()``."""
    names: dict[int, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), name)
    return names


def optimizer_layout(optimizer: Optimizer, names: Mapping[int, str]) -> list[dict[str, Any]]:
    """Each param group's settings and its parameters' names, in order (the single-device numbering)."""
    return [
        {**{k: v for k, v in group.items() if k != "params"}, "param_names": [names[id(p)] for p in group["params"]]}
        for group in optimizer.param_groups
    ]


def optimizer_state_by_name(optimizer: Optimizer, names: Mapping[int, str], index: int = 0) -> dict[str, Tensor]:
    """Flat checkpoint entries ``optimizer/<index>/<name>/<key>`` of the parameters in ``optimizer``.

    Non-tensor entries are stored as 0-d float64 tensors (restored as Python floats).

    Raises:
        ValueError: if a parameter of ``optimizer`` has no name in ``names``.
    """
    out: dict[str, Tensor] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            if id(param) not in names:
                raise ValueError(
                    f"optimizer {index} steps a parameter of shape {tuple(param.shape)} that is not part of the "
                    "module; only the module's own parameters can be checkpointed by name."
                )
            for key, value in optimizer.state.get(param, {}).items():
                tensor = value if isinstance(value, Tensor) else torch.tensor(float(value), dtype=torch.float64)
                out[f"{OPTIMIZER_PREFIX}{index}/{names[id(param)]}/{key}"] = tensor.detach()
    return out


def save_sharded(
    directory: str | Path, tensors: Mapping[str, Tensor], meta: Mapping[str, Any], *, process_group: Any = None
) -> None:
    """Write this rank's ``tensors`` into ``directory`` (collective); global rank 0 writes ``meta`` last.

    Args:
        directory: the checkpoint directory (created; an existing checkpoint there is replaced).
        tensors: this rank's flat entries (``model/...``, ``optimizer/...``).
        meta: the non-tensor part, the same on every rank (only rank 0's is written).
        process_group: the ranks that write (default: all).
    """
    path = Path(directory)
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        for stale in (path / META_FILE, path / DCP_METADATA):
            stale.unlink(missing_ok=True)  # a crash during this save must not leave an old, complete-looking mark
    if distributed:
        dist.barrier(group=process_group)
    dcp.save(dict(tensors), checkpoint_id=path, process_group=process_group, no_dist=not distributed)
    if distributed:
        dist.barrier(group=process_group)
    if rank == 0:
        tmp = path / (META_FILE + ".tmp")
        torch.save(dict(meta), tmp)
        tmp.replace(path / META_FILE)
    if distributed:
        dist.barrier(group=process_group)


def check_complete(directory: str | Path) -> None:
    """Refuse a directory that is not a complete sharded checkpoint, naming what is missing.

    Raises:
        FileNotFoundError: if the directory does not exist.
        ValueError: if DCP's ``.metadata`` or :data:`META_FILE` is missing (an interrupted save).
    """
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"The sharded checkpoint directory {path} does not exist.")
    missing = [name for name in (DCP_METADATA, META_FILE) if not (path / name).is_file()]
    if missing:
        raise ValueError(
            f"{path} is not a complete sharded checkpoint: {' and '.join(missing)} missing. The save was "
            "interrupted or is still being written; resume from an earlier checkpoint, or delete this directory."
        )


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The non-tensor part of a complete checkpoint (:func:`check_complete` first)."""
    check_complete(directory)
    meta: dict[str, Any] = torch.load(Path(directory) / META_FILE, map_location="cpu", weights_only=False)
    return meta


def stored_shapes(directory: str | Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Every stored key with its full shape and dtype."""
    check_complete(directory)
    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    return {
        key: (value.size, value.properties.dtype)
        for key, value in metadata.state_dict_metadata.items()
        if isinstance(value, TensorStorageMetadata)
    }


def load_sharded(
    directory: str | Path, keys: Sequence[str], *, device: torch.device | str = "cpu", process_group: Any = None
) -> dict[str, Tensor]:
    """Read the entries ``keys`` (collective; each rank asks for its own keys, in any layout).

    Raises:
        ValueError: for an incomplete checkpoint, or a key the checkpoint does not hold.
    """
    shapes = stored_shapes(directory)
    absent = [key for key in keys if key not in shapes]
    if absent:
        raise ValueError(
            f"The checkpoint {directory} holds no {', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''}; "
            "it was written for another model (compare the module's state-dict names)."
        )
    state = {key: torch.empty(shapes[key][0], dtype=shapes[key][1], device=device) for key in keys}
    distributed = dist.is_available() and dist.is_initialized()
    dcp.load(state, checkpoint_id=Path(directory), process_group=process_group, no_dist=not distributed)
    return state


def optimizer_keys(directory: str | Path, index: int, names: Sequence[str]) -> list[str]:
    """The stored optimizer-state keys of optimizer ``index`` for the parameters called ``names``."""
    wanted = set(names)
    prefix = f"{OPTIMIZER_PREFIX}{index}/"
    return [
        key
        for key in stored_shapes(directory)
        if key.startswith(prefix) and key[len(prefix) :].rsplit("/", 1)[0] in wanted
    ]


def load_optimizer_state_by_name(
    optimizer: Optimizer, names: Mapping[int, str], entries: Mapping[str, Tensor], index: int = 0
) -> None:
    """Install ``optimizer/<index>/<name>/<key>`` entries into ``optimizer`` (its param groups stay as built).

    Every copy of a parameter name (Chimera's second stage copy, a tied parameter's copies) gets its own
    tensors. 0-d float64 entries that stood for Python numbers become floats again, except ``step``, which
    stays a tensor as torch's optimizers keep it.
    """
    prefix = f"{OPTIMIZER_PREFIX}{index}/"
    by_name: dict[str, dict[str, Any]] = {}
    for key, value in entries.items():
        if not key.startswith(prefix):
            continue
        name, entry = key[len(prefix) :].rsplit("/", 1)
        by_name.setdefault(name, {})[entry] = value
    state_dict = optimizer.state_dict()
    state: dict[int, dict[str, Any]] = {}
    position = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            stored = by_name.get(names.get(id(param), ""))
            if stored:
                state[position] = {key: _restore(key, value, param) for key, value in stored.items()}
            position += 1
    optimizer.load_state_dict({"state": state, "param_groups": state_dict["param_groups"]})


def _restore(key: str, value: Tensor, param: Tensor) -> Any:
    if value.dim() == 0 and value.dtype == torch.float64 and key != "step":
        return float(value)
    if value.dim() == 0:
        return value.clone()
    return value.to(param.device).clone()


__all__ = [
    "DCP_METADATA",
    "META_FILE",
    "MODEL_PREFIX",
    "OPTIMIZER_PREFIX",
    "check_complete",
    "load_optimizer_state_by_name",
    "load_sharded",
    "optimizer_keys",
    "optimizer_layout",
    "optimizer_state_by_name",
    "parameter_names",
    "read_meta",
    "save_sharded",
    "stored_shapes",
]
