"""``lightning-parallel consolidate CKPT_DIR OUT.ckpt``: one single-device checkpoint from a sharded one.

Reads every shard of a sharded pipeline checkpoint (:mod:`lightning_parallel.pipeline.stage_checkpoint`)
in one process and writes a plain Lightning checkpoint: ``state_dict`` under the module's own names and
``optimizer_states`` numbered the way the module's ``configure_optimizers`` numbers them on one device,
next to the loops, callbacks and hyper-parameters of the original. ``YourModule.load_from_checkpoint``
reads it, and ``trainer.fit(ckpt_path=...)`` resumes from it on one device or under DDP.

The whole model is loaded into this process's memory: run it on a machine that can hold the model (and,
for its optimizer state, twice or three times that for Adam).

This module imports no Lightning.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_parallel.pipeline.stage_checkpoint import (
    MODEL_PREFIX,
    OPTIMIZER_PREFIX,
    load_sharded,
    read_meta,
    stored_shapes,
)


def consolidated_checkpoint(directory: str | Path) -> dict[str, Any]:
    """The single-device Lightning checkpoint dict of the sharded checkpoint in ``directory``.

    Raises:
        FileNotFoundError: if the directory does not exist.
        ValueError: if it is not a complete sharded checkpoint.
    """
    meta = read_meta(directory)
    entries = load_sharded(directory, list(stored_shapes(directory)))
    checkpoint: dict[str, Any] = dict(meta.get("checkpoint", {}))
    checkpoint["state_dict"] = {
        key[len(MODEL_PREFIX) :]: value for key, value in entries.items() if key.startswith(MODEL_PREFIX)
    }
    state_dict = checkpoint["state_dict"]
    for name, aliases in meta.get("aliases", {}).items():
        for alias in aliases:  # a tied parameter is stored once, under its first name
            if name in state_dict:
                state_dict.setdefault(alias, state_dict[name])
    companions = meta.get("companions")
    if companions:  # e.g. interlocking's auxiliary heads: kept beside state_dict, as in a single-file checkpoint
        prefix = companions["prefix"]
        moved = {key[len(prefix) :]: state_dict.pop(key) for key in [k for k in state_dict if k.startswith(prefix)]}
        checkpoint.setdefault(companions["key"], {})[companions["entry"]] = moved
    optimizer_states = []
    for index, layout in enumerate(meta.get("optimizers", [])):
        prefix = f"{OPTIMIZER_PREFIX}{index}/"
        by_name: dict[str, dict[str, Any]] = {}
        for key, value in entries.items():
            if key.startswith(prefix):
                name, entry = key[len(prefix) :].rsplit("/", 1)
                is_number = value.dim() == 0 and value.dtype == torch.float64 and entry != "step"
                by_name.setdefault(name, {})[entry] = float(value) if is_number else value
        state: dict[int, dict[str, Any]] = {}
        param_groups = []
        position = 0
        for group in layout:
            indices = []
            for name in group["param_names"]:
                if name in by_name:
                    state[position] = by_name[name]
                indices.append(position)
                position += 1
            param_groups.append({**{k: v for k, v in group.items() if k != "param_names"}, "params": indices})
        optimizer_states.append({"state": state, "param_groups": param_groups})
    checkpoint["optimizer_states"] = optimizer_states
    return checkpoint


def consolidate(directory: str | Path, output: str | Path) -> Path:
    """Write the consolidated checkpoint of ``directory`` to ``output`` (see :func:`consolidated_checkpoint`)."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(consolidated_checkpoint(directory), out)
    return out


def consolidate_command(argv: Sequence[str]) -> int:
    """``lightning-parallel consolidate CKPT_DIR OUT.ckpt``; returns the exit status (2 for bad input)."""
    parser = argparse.ArgumentParser(
        prog="lightning-parallel consolidate",
        description="Write a single-device Lightning checkpoint from a sharded pipeline checkpoint directory.",
    )
    parser.add_argument("checkpoint_dir", help="the sharded checkpoint directory (save_distributed_checkpoint=True)")
    parser.add_argument("output", help="the .ckpt file to write")
    args = parser.parse_args(list(argv))
    try:
        out = consolidate(args.checkpoint_dir, args.output)
    except (FileNotFoundError, ValueError) as err:
        print(f"lightning-parallel consolidate: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


__all__ = ["consolidate", "consolidate_command", "consolidated_checkpoint"]
