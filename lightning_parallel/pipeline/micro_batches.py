"""Cut a batch into micro-batches: the one splitter of every pipeline strategy and engine.

Design decisions:

- A micro-batch is a slice of the batch along dimension 0 of every tensor in it; tuples, lists and dicts
  are split element-wise (named tuples keep their type).
- One remainder policy: micro-batch ``i`` holds examples ``[round(i * B / N), round((i + 1) * B / N))``,
  so the sizes are equal when ``N`` divides ``B`` and differ by at most one otherwise (an epoch's last
  batch). Callers that average per-micro-batch losses weigh them by size.
- A batch with fewer examples than micro-batches is refused (``ValueError`` with the counts): a schedule of
  ``N`` micro-batches cannot run on fewer, and quietly running fewer would change what a step means.
- Non-tensor contents: a list or tuple of non-tensors whose length is the batch size (e.g. a list of ids
  or strings) is per-example data and is sliced like a tensor; one of another length is refused, because
  it cannot be told apart from per-batch data. Other non-tensor leaves (numbers, strings, ``None``) are
  per-batch values and are repeated in every micro-batch.

This module imports no Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def batch_size(batch: Any) -> int:
    """The size of dimension 0 of the first tensor found in ``batch``.

    Raises:
        TypeError: if ``batch`` holds no tensor.
    """
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        try:
            return batch_size(value)
        except TypeError:
            continue
    raise TypeError(f"Found no tensor in a batch of type {type(batch).__name__}.")


def split_micro_batches(batch: Any, chunks: int) -> list[Any]:
    """Split ``batch`` into ``chunks`` micro-batches along dimension 0 whose sizes differ by at most one.

    Args:
        batch: a tensor, or a (nested) tuple, list or dict holding at least one tensor.
        chunks: the number of micro-batches.

    Raises:
        ValueError: if ``chunks < 1``, the batch has fewer examples than ``chunks``, or it holds a list or
            tuple of non-tensors whose length is not the batch size.
    """
    size = batch_size(batch)
    if chunks < 1:
        raise ValueError(f"micro_batches={chunks} must be positive, e.g. 4.")
    if size < chunks:
        raise ValueError(
            f"A batch of {size} examples cannot feed micro_batches={chunks} (every micro-batch needs an example); "
            f"use a batch size of at least {chunks} (a multiple of {chunks} splits evenly), fewer micro_batches, "
            "or drop_last=True in the DataLoader."
        )
    bounds = [round(i * size / chunks) for i in range(chunks + 1)]
    return [_slice(batch, bounds[i], bounds[i + 1], size) for i in range(chunks)]


def _slice(batch: Any, start: int, stop: int, size: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return {key: _slice(value, start, stop, size) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        if batch and not any(_holds_tensor(value) for value in batch):
            if len(batch) != size:
                raise ValueError(
                    f"The batch holds a {type(batch).__name__} of {len(batch)} non-tensor values but has {size} "
                    "examples, so it cannot be split into micro-batches: give per-example values as a "
                    f"{type(batch).__name__} of {size} entries (or a tensor), and per-batch values as a plain "
                    "number or string."
                )
            return batch[start:stop]
        parts = [_slice(value, start, stop, size) for value in batch]
        if isinstance(batch, list):
            return parts
        return type(batch)(*parts) if hasattr(batch, "_fields") else tuple(parts)  # namedtuples keep their type
    return batch


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, Mapping):
        return any(_holds_tensor(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v) for v in value)
    return False


__all__ = ["batch_size", "split_micro_batches"]
