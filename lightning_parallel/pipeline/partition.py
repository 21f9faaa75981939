"""Split an ordered list of blocks into balanced contiguous stages.

A partition is written as the number of blocks per stage, e.g. ``[3, 2, 2, 1]`` puts blocks 0-2 on
stage 0, blocks 3-4 on stage 1 and so on. Methods:

- ``uniform``: equal block counts (earlier stages take the remainder), the way DeepSpeed's
  ``partition_method="uniform"`` does it. :func:`outer_first_partition` is the same with the remainder
  given to the outer stages first (the default of interlocking backprop, whose first and last blocks,
  stem and pooling head, are usually the cheapest).
- ``parameters``: balance the number of parameters per stage (DeepSpeed's default).
- ``profile``: measure each block's forward + backward time, parameter bytes and the bytes it saves
  for backward on one micro-batch (:func:`profile_blocks`), then balance the time.
- ``flops``: count each block's forward + backward floating-point operations on one micro-batch
  (:func:`flop_counts`, ``torch.utils.flop_counter`` over meta tensors: no weight needs to exist and
  nothing is computed), then balance the count. The default for modules built on the meta device, where
  there is nothing to time.

Balancing is exact: :func:`balanced_partition` is a dynamic programme over (blocks, stages) that returns a
contiguous partition whose slowest stage is as fast as any contiguous partition allows (the classic
linear-partition problem, O(stages x blocks^2)). Ties between optimal partitions are broken towards the
smallest sum of squared stage costs, which keeps non-bottleneck stages even as well.

This module imports no Lightning.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

PartitionMethod = Literal["uniform", "parameters", "profile", "flops"]
PARTITION_METHODS: tuple[str, ...] = ("uniform", "parameters", "profile", "flops")


@dataclass(frozen=True)
class BlockProfile:
    """Measured cost of one block on one micro-batch.

    Attributes:
        forward_s: median forward time in seconds.
        backward_s: median backward time in seconds.
        parameter_bytes: bytes of the block's parameters.
        activation_bytes: bytes of the tensors the block saves for backward (parameters excluded).
    """

    forward_s: float
    backward_s: float
    parameter_bytes: int
    activation_bytes: int

    @property
    def time_s(self) -> float:
        """Forward plus backward time in seconds."""
        return self.forward_s + self.backward_s


def uniform_partition(num_blocks: int, stages: int) -> list[int]:
    """Blocks per stage with equal counts; the first ``num_blocks % stages`` stages take one more.

    Args:
        num_blocks: number of blocks.
        stages: number of stages.
    """
    _check_counts(num_blocks, stages)
    base, extra = divmod(num_blocks, stages)
    return [base + (1 if s < extra else 0) for s in range(stages)]


def outer_first_partition(num_blocks: int, stages: int) -> list[int]:
    """Blocks per stage with equal counts; the leftover blocks go to the outer stages first.

    The order is last, first, second-to-last, second, ...: ``outer_first_partition(6, 4) == [2, 1, 1, 2]``.

    Args:
        num_blocks: number of blocks.
        stages: number of stages.
    """
    _check_counts(num_blocks, stages)
    counts = [num_blocks // stages] * stages
    outer_first = sorted(range(stages), key=lambda s: (min(s, stages - 1 - s), -s))
    for s in outer_first[: num_blocks % stages]:
        counts[s] += 1
    return counts


def balanced_partition(costs: Sequence[float], stages: int) -> list[int]:
    """Blocks per stage of the contiguous partition whose most expensive stage is the cheapest possible.

    Every stage gets at least one block. Exact dynamic programme; among optimal partitions the one with the
    smallest sum of squared stage costs is returned.

    Args:
        costs: the non-negative cost of each block, in order.
        stages: number of stages.

    Raises:
        ValueError: if a cost is negative or not finite, or there are fewer blocks than stages.
    """
    _check_counts(len(costs), stages)
    for index, cost in enumerate(costs):
        if not math.isfinite(cost) or cost < 0:
            raise ValueError(f"costs[{index}]={cost} must be a finite, non-negative number.")
    n = len(costs)
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + float(cost))
    inf = (math.inf, math.inf)
    # best[s][i]: (bottleneck, sum of squares) of the best split of blocks [0, i) into s stages.
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = (0.0, 0.0)
    for s in range(1, stages + 1):
        # Leave at least one block for each of the remaining stages.
        for i in range(s, n - (stages - s) + 1):
            for j in range(s - 1, i):
                prev = best[s - 1][j]
                if prev[0] == math.inf:
                    continue
                stage_cost = prefix[i] - prefix[j]
                candidate = (max(prev[0], stage_cost), prev[1] + stage_cost * stage_cost)
                if _better(candidate, best[s][i]):
                    best[s][i] = candidate
                    cut[s][i] = j
    sizes: list[int] = []
    end = n
    for s in range(stages, 0, -1):
        start = cut[s][end]
        sizes.append(end - start)
        end = start
    return sizes[::-1]


def _better(a: tuple[float, float], b: tuple[float, float]) -> bool:
    # Relative tolerance so that float rounding in the prefix sums does not decide between equal bottlenecks.
    tol = 1e-12 * max(1.0, abs(a[0]), abs(b[0]) if b[0] != math.inf else 0.0)
    if a[0] < b[0] - tol:
        return True
    if a[0] > b[0] + tol:
        return False
    return a[1] < b[1]


def stage_costs(costs: Sequence[float], sizes: Sequence[int]) -> list[float]:
    """The summed cost of each stage of the partition ``sizes``."""
    out: list[float] = []
    start = 0
    for size in sizes:
        out.append(float(sum(costs[start : start + size])))
        start += size
    return out


def stage_slices(sizes: Sequence[int]) -> list[slice]:
    """The block slice of each stage: ``[2, 3]`` gives ``[slice(0, 2), slice(2, 5)]``."""
    slices: list[slice] = []
    start = 0
    for size in sizes:
        slices.append(slice(start, start + size))
        start += size
    return slices


def check_partition(sizes: Sequence[int], num_blocks: int, stages: int) -> list[int]:
    """Validate an explicit partition (blocks per stage) and return it as a list.

    Raises:
        ValueError: if it has the wrong length, an empty stage, or does not cover the blocks exactly.
    """
    sizes = [int(size) for size in sizes]
    if len(sizes) != stages:
        raise ValueError(
            f"partition={sizes} lists {len(sizes)} stages but stages={stages}; give one block count per stage."
        )
    if any(size < 1 for size in sizes):
        raise ValueError(f"partition={sizes} has an empty stage; every stage needs at least one block.")
    if sum(sizes) != num_blocks:
        raise ValueError(
            f"partition={sizes} covers {sum(sizes)} blocks but the model has {num_blocks}; "
            f"the counts must add up to {num_blocks}."
        )
    return sizes


def parameter_counts(blocks: Sequence[nn.Module]) -> list[int]:
    """Number of parameter elements of each block (a parameter shared by blocks counts in the first)."""
    seen: set[int] = set()
    counts: list[int] = []
    for block in blocks:
        total = 0
        for param in block.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel()
        counts.append(total)
    return counts


def profile_blocks(
    blocks: Sequence[nn.Module], sample_input: torch.Tensor, *, repeats: int = 3, warmup: int = 1
) -> list[BlockProfile]:
    """Measure forward and backward time, parameter bytes and saved-activation bytes of each block.

    Block i is run on the output of block i-1 (starting from ``sample_input``); its backward is driven by a
    gradient of ones. Times are medians over ``repeats`` runs after ``warmup`` runs. The blocks'
    ``.grad`` fields, buffers and the random number generators are left as they were.

    Args:
        blocks: the ordered blocks.
        sample_input: the first block's input for one micro-batch.
        repeats: timed runs per block. Default 3.
        warmup: untimed runs per block before timing. Default 1.

    Raises:
        ValueError: if ``repeats`` < 1 or ``warmup`` < 0.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be at least 1.")
    if warmup < 0:
        raise ValueError(f"warmup={warmup} must be >= 0.")
    # Profiling must leave no trace: buffers (BatchNorm statistics) and random streams are restored.
    buffers = [(buffer, buffer.detach().clone()) for block in blocks for buffer in block.buffers()]
    devices = [sample_input.device] if sample_input.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        profiles = _profile(blocks, sample_input, repeats, warmup)
    with torch.no_grad():
        for buffer, saved in buffers:
            buffer.copy_(saved)
    return profiles


def _profile(blocks: Sequence[nn.Module], sample_input: torch.Tensor, repeats: int, warmup: int) -> list[BlockProfile]:
    profiles: list[BlockProfile] = []
    x = sample_input.detach()
    for block in blocks:
        params = list(block.parameters())
        saved_grads = [p.grad for p in params]
        param_storages = {p.untyped_storage().data_ptr() for p in params}
        forward_times: list[float] = []
        backward_times: list[float] = []
        saved_bytes = 0
        out = x
        for run in range(warmup + repeats):
            inp = x.detach().requires_grad_(x.is_floating_point())
            counter = _SavedBytes(param_storages)
            start = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, _unpack):
                out = block(inp)
            middle = time.perf_counter()
            if out.requires_grad:
                out.backward(torch.ones_like(out))
            end = time.perf_counter()
            if run >= warmup:
                forward_times.append(middle - start)
                backward_times.append(end - middle)
                saved_bytes = counter.total
        for param, grad in zip(params, saved_grads):
            param.grad = grad
        profiles.append(
            BlockProfile(
                forward_s=statistics.median(forward_times),
                backward_s=statistics.median(backward_times),
                parameter_bytes=sum(p.numel() * p.element_size() for p in params),
                activation_bytes=saved_bytes,
            )
        )
        x = out.detach()
    return profiles


class _SavedBytes:
    """Counts the bytes of tensors saved for backward, skipping those that share a parameter's storage."""

    def __init__(self, param_storages: set[int]) -> None:
        self.param_storages = param_storages
        self.total = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in self.param_storages:
            self.total += tensor.numel() * tensor.element_size()
        return tensor


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def partition_blocks(
    blocks: Sequence[nn.Module],
    stages: int,
    method: PartitionMethod | str | Sequence[int] = "uniform",
    *,
    sample_input: torch.Tensor | None = None,
    profiles: Sequence[BlockProfile] | None = None,
) -> list[int]:
    """Blocks per stage for ``blocks`` split into ``stages`` contiguous stages.

    Args:
        blocks: the ordered blocks.
        stages: number of stages.
        method: ``"uniform"``, ``"parameters"``, ``"profile"``, ``"flops"`` or an explicit list of blocks
            per stage.
        sample_input: the first block's input for one micro-batch (``"profile"`` unless ``profiles`` is
            given, and ``"flops"``; for ``"flops"`` only its shape and dtype matter).
        profiles: measured block costs to use instead of profiling again (``"profile"`` only).

    Raises:
        ValueError: for an unknown method, a bad explicit partition, or ``"profile"`` without a sample.
    """
    num_blocks = len(blocks)
    if not isinstance(method, str):
        return check_partition(method, num_blocks, stages)
    if method == "uniform":
        return uniform_partition(num_blocks, stages)
    if method == "parameters":
        return balanced_partition([float(c) for c in parameter_counts(blocks)], stages)
    if method == "profile":
        if profiles is None:
            if sample_input is None:
                raise ValueError(
                    "partition='profile' needs sample_input (the first block's input of one micro-batch) "
                    "or measured profiles."
                )
            profiles = profile_blocks(blocks, sample_input)
        if len(profiles) != num_blocks:
            raise ValueError(f"profiles has {len(profiles)} entries but there are {num_blocks} blocks.")
        return balanced_partition([p.time_s for p in profiles], stages)
    if method == "flops":
        if sample_input is None:
            raise ValueError(
                "partition='flops' needs sample_input (the first block's input of one micro-batch; a meta "
                "tensor of the right shape is enough)."
            )
        return balanced_partition([float(c) for c in flop_counts(blocks, sample_input)], stages)
    raise ValueError(
        f"partition={method!r} is not one of {PARTITION_METHODS} or a list of blocks per stage, e.g. [2, 2]."
    )


def _check_counts(num_blocks: int, stages: int) -> None:
    if stages < 1:
        raise ValueError(f"stages={stages} must be at least 1.")
    if num_blocks < stages:
        raise ValueError(
            f"{num_blocks} blocks cannot fill stages={stages} (every stage needs at least one block); "
            f"use at most {num_blocks} stages or split the model into more blocks."
        )


def flop_counts(blocks: Sequence[nn.Module], sample_input: torch.Tensor, *, backward: bool = True) -> list[int]:
    """Floating-point operations of each block's forward (and backward) on one micro-batch, counted on meta.

    Every block runs on meta copies of its parameters and buffers (``torch.func.functional_call``; the
    block itself is not changed and may be on the meta device or materialised), so nothing is computed and
    no memory is allocated beyond meta tensors. Block i runs on the meta output of block i-1. Operations
    that ``FlopCounterMode`` does not count (element-wise ones, norms, softmax) count zero: the cost is
    dominated by matrix products, which it counts exactly (``2 x m x n x k`` per product).

    Args:
        blocks: the ordered blocks.
        sample_input: the first block's input for one micro-batch; only its shape and dtype are used.
        backward: also count the backward pass (weight and input gradients). Default True.
    """
    from torch.func import functional_call
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.empty_like(sample_input, device="meta")
    counts: list[int] = []
    for block in blocks:
        state = {
            name: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)
            for name, t in [*block.named_parameters(), *block.named_buffers()]
        }
        inp = x.detach().requires_grad_(backward and x.is_floating_point())
        counter = FlopCounterMode(display=False)
        with counter:
            out = functional_call(block, state, (inp,))
            if backward and out.requires_grad:
                out.backward(torch.empty_like(out))
        counts.append(int(counter.get_total_flops()))
        x = out.detach()
    return counts


def describe_partition(sizes: Sequence[int], costs: Sequence[float] | None = None) -> str:
    """One line per stage: its block range and, if given, its cost."""
    lines = []
    for stage, block_slice in enumerate(stage_slices(sizes)):
        line = f"stage {stage}: blocks {block_slice.start}-{block_slice.stop - 1}"
        if costs is not None:
            line += f" cost {sum(costs[block_slice]):.4g}"
        lines.append(line)
    return "\n".join(lines)


__all__ = [
    "PARTITION_METHODS",
    "BlockProfile",
    "PartitionMethod",
    "balanced_partition",
    "check_partition",
    "describe_partition",
    "flop_counts",
    "outer_first_partition",
    "parameter_counts",
    "partition_blocks",
    "profile_blocks",
    "stage_costs",
    "stage_slices",
    "uniform_partition",
]
