"""Partitioning: the dynamic programme against brute force, and the profiler on blocks of known cost."""

from __future__ import annotations

import itertools
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_parallel.pipeline.partition import (
    balanced_partition,
    check_partition,
    parameter_counts,
    partition_blocks,
    profile_blocks,
    stage_costs,
    stage_slices,
    uniform_partition,
)


def brute_force_bottleneck(costs: list[float], stages: int) -> float:
    """The smallest largest-stage cost over every contiguous partition into non-empty stages."""
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = (0, *cuts, n)
        best = min(best, max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


@settings(max_examples=150, deadline=None)
@given(
    costs=st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=9),
    stages=st.integers(min_value=1, max_value=5),
)
def test_balanced_partition_is_optimal(costs: list[int], stages: int) -> None:
    if stages > len(costs):
        with pytest.raises(ValueError, match="cannot fill stages"):
            balanced_partition(costs, stages)
        return
    sizes = balanced_partition([float(c) for c in costs], stages)
    assert len(sizes) == stages and all(size >= 1 for size in sizes) and sum(sizes) == len(costs)
    assert max(stage_costs(costs, sizes)) == brute_force_bottleneck([float(c) for c in costs], stages)


def test_balanced_partition_examples() -> None:
    costs = [1.0, 1.0, 1.0, 1.0, 8.0, 1.0, 1.0, 1.0]
    sizes = balanced_partition(costs, 4)
    assert max(stage_costs(costs, sizes)) == 8
    # Uniform counts would put 9 on one stage; the optimum is 8 with the heavy block alone.
    assert max(stage_costs([1, 1, 1, 1, 8, 1, 1, 1], uniform_partition(8, 4))) == 9
    # Among equal bottlenecks, the flatter split wins: [2, 2, 2] over [1, 1, 4]-style splits.
    assert balanced_partition([1.0] * 6, 3) == [2, 2, 2]
    assert balanced_partition([5.0, 0.0, 0.0, 5.0], 2) in ([1, 3], [2, 2], [3, 1])


def test_uniform_partition() -> None:
    assert uniform_partition(10, 4) == [3, 3, 2, 2]
    assert uniform_partition(4, 4) == [1, 1, 1, 1]
    assert stage_slices([2, 3]) == [slice(0, 2), slice(2, 5)]


def test_bad_partitions_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"stages=0 must be at least 1"):
        uniform_partition(3, 0)
    with pytest.raises(ValueError, match=r"2 blocks cannot fill stages=3"):
        uniform_partition(2, 3)
    with pytest.raises(ValueError, match=r"costs\[1\]=-1.0 must be a finite"):
        balanced_partition([1.0, -1.0], 1)
    with pytest.raises(ValueError, match=r"partition=\[1, 2\] lists 2 stages but stages=3"):
        check_partition([1, 2], 3, 3)
    with pytest.raises(ValueError, match=r"partition=\[0, 3\] has an empty stage"):
        check_partition([0, 3], 3, 2)
    with pytest.raises(ValueError, match=r"covers 4 blocks but the model has 3"):
        check_partition([2, 2], 3, 2)
    blocks = [nn.Linear(2, 2) for _ in range(3)]
    with pytest.raises(ValueError, match=r"partition='fastest' is not one of"):
        partition_blocks(blocks, 2, "fastest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"partition='profile' needs sample_input"):
        partition_blocks(blocks, 2, "profile")
    with pytest.raises(ValueError, match=r"repeats=0 must be at least 1"):
        profile_blocks(blocks, torch.zeros(1, 2), repeats=0)


def test_parameter_partition_balances_parameter_counts() -> None:
    widths = [8, 64, 8, 8, 8, 8]
    blocks = [nn.Linear(w, w) for w in widths]
    counts = parameter_counts(blocks)
    assert counts == [w * w + w for w in widths]
    sizes = partition_blocks(blocks, 2, "parameters")
    assert max(stage_costs([float(c) for c in counts], sizes)) == brute_force_bottleneck(
        [float(c) for c in counts], 2
    )
    assert partition_blocks(blocks, 2, [5, 1]) == [5, 1]


class SleepBlock(nn.Module):
    """A block of known cost: sleeps ``ms`` milliseconds in forward and twice that in backward."""

    def __init__(self, ms: float, width: int = 4) -> None:
        super().__init__()
        self.ms = ms
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Sleep.apply(self.linear(x), self.ms)


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ms):  # type: ignore[no-untyped-def,override]
        ctx.ms = ms
        time.sleep(ms / 1000)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def,override]
        time.sleep(2 * ctx.ms / 1000)
        return grad, None


def test_profiling_leaves_no_trace() -> None:
    blocks = [nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)) for _ in range(2)]
    before = [{k: v.clone() for k, v in b.state_dict().items()} for b in blocks]
    torch.manual_seed(3)
    expected_next = torch.rand(3)
    torch.manual_seed(3)
    profile_blocks(blocks, torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), repeats=2)
    torch.testing.assert_close(torch.rand(3), expected_next)
    for block, saved in zip(blocks, before):
        for key, value in block.state_dict().items():
            torch.testing.assert_close(value, saved[key])
        assert all(p.grad is None for p in block.parameters())


def test_profile_partition_finds_the_optimum_on_unequal_blocks() -> None:
    # Equal parameters, very unequal time: only profiling can see the heavy blocks.
    ms = [2.0, 2.0, 2.0, 2.0, 20.0, 2.0, 2.0, 20.0]
    blocks = [SleepBlock(m) for m in ms]
    sample = torch.randn(3, 4)
    profiles = profile_blocks(blocks, sample, repeats=1, warmup=0)
    assert all(p.forward_s >= m / 1000 for p, m in zip(profiles, ms))
    assert all(p.backward_s >= 2 * m / 1000 for p, m in zip(profiles, ms))
    assert all(p.parameter_bytes == (16 + 4) * 4 for p in profiles)
    # Linear saves its input (3 x 4 floats): the bytes seen by the saved-tensor hooks.
    assert all(p.activation_bytes >= 3 * 4 * 4 for p in profiles)
    assert all(block.linear.weight.grad is None for block in blocks)
    true_costs = [3 * m for m in ms]
    optimum = brute_force_bottleneck(true_costs, 4)
    by_profile = partition_blocks(blocks, 4, "profile", profiles=profiles)
    assert max(stage_costs(true_costs, by_profile)) == optimum
    assert max(stage_costs(true_costs, partition_blocks(blocks, 4, "uniform"))) > optimum
    assert max(stage_costs(true_costs, partition_blocks(blocks, 4, "parameters"))) > optimum
