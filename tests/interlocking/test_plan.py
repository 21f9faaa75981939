"""The interlocking plan, stage split, auxiliary heads and the runtime's order: pure unit tests."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lightning_parallel.interlocking.heads import build_aux_heads, default_aux_head, split_trunk
from lightning_parallel.interlocking.plan import (
    InterlockingPlan,
    check_width,
    stages_of_rank,
)
from lightning_parallel.interlocking.runtime import InterlockingRuntime
from lightning_parallel.pipeline.partition import check_partition, outer_first_partition
from tests.interlocking.helpers import image_batches, tiny_model


def test_targets_follow_min_j_plus_k_minus_1() -> None:
    assert [InterlockingPlan(4, 1).target(j) for j in range(4)] == [0, 1, 2, 3]
    assert [InterlockingPlan(4, 2).target(j) for j in range(4)] == [1, 2, 3, 3]
    assert [InterlockingPlan(4, 3).target(j) for j in range(4)] == [2, 3, 3, 3]
    assert [InterlockingPlan(4, 4).target(j) for j in range(4)] == [3, 3, 3, 3]


def test_gradient_paths_for_k2() -> None:
    plan = InterlockingPlan(4, 2)
    assert plan.users(0) == [] and plan.reach(0) is None  # head 0 trains only itself
    assert plan.users(3) == [2, 3]
    assert [plan.passes(s) for s in range(4)] == [[1], [1, 2], [2, 3], [3]]
    assert [plan.sent(s) for s in range(4)] == [[], [1], [2], [3]]
    assert all(plan.sent_late(s) == [] for s in range(4))  # one hop: early messages only
    assert [plan.depth(s) for s in range(4)] == [1, 1, 1, 0]


def test_gradient_paths_for_end_to_end_and_local() -> None:
    e2e = InterlockingPlan(4, 4)
    assert [e2e.passes(s) for s in range(4)] == [[3], [3], [3], [3]]
    assert [e2e.needs_input(s, 3) for s in range(4)] == [False, True, True, True]
    assert [e2e.depth(s) for s in range(4)] == [3, 2, 1, 0]  # 1F1B warmup
    local = InterlockingPlan(4, 1)
    assert [local.passes(s) for s in range(4)] == [[0], [1], [2], [3]]
    assert not any(local.has_backward(s) or local.sent(s) for s in range(4))


@pytest.mark.parametrize("stages", [1, 2, 3, 5, 8])
def test_every_stage_gets_exactly_one_weight_gradient(stages: int) -> None:
    for k in range(1, stages + 1):
        plan = InterlockingPlan(stages, k)
        for j in range(stages):
            weight_targets = [t for t in plan.passes(j) if plan.needs_weight(j, t)]
            assert weight_targets == [plan.target(j)]
            assert plan.received(j) == (plan.sent(j + 1) if j + 1 < stages else [])


def test_default_partition_gives_leftovers_to_the_outer_stages() -> None:
    assert outer_first_partition(6, 4) == [2, 1, 1, 2]
    assert outer_first_partition(5, 4) == [1, 1, 1, 2]
    assert outer_first_partition(8, 4) == [2, 2, 2, 2]
    model, batch = tiny_model(), image_batches(1)[0]
    blocks = list(model.pipeline_blocks())
    default, _ = split_trunk(model, 4, batch)
    assert [len(stage) for stage in default] == outer_first_partition(len(blocks), 4)
    explicit, _ = split_trunk(model, 2, batch, partition=[1, len(blocks) - 1])
    assert list(explicit[0]) == blocks[:1] and list(explicit[1]) == blocks[1:]


def test_stages_of_rank() -> None:
    assert stages_of_rank(1, 2, 4) == [2, 3]
    assert stages_of_rank(3, 4, 4) == [3]


def test_runtime_order_is_one_forward_ahead_for_k2() -> None:
    model, batch = tiny_model(), image_batches()[0]
    stage_blocks, heads = split_trunk(model, 4, batch)
    runtime = InterlockingRuntime(
        InterlockingPlan(4, 2), stage_blocks, heads, model.pipeline_input, model.pipeline_loss
    )
    assert runtime.order(4) == [("F", m) for m in range(4)]  # single process: backwards run inside F
    runtime.has_backward, runtime.warmup = True, 1
    assert runtime.order(4) == [
        ("F", 0),
        ("F", 1),
        ("B", 0),
        ("F", 2),
        ("B", 1),
        ("F", 3),
        ("B", 2),
        ("B", 3),
    ]


def test_default_heads() -> None:
    image = default_aux_head(0, torch.randn(2, 8, 4, 4), torch.randn(2, 10))
    assert image(torch.randn(2, 8, 4, 4)).shape == (2, 10)
    tokens = default_aux_head(0, torch.randn(2, 5, 16), torch.randn(2, 5, 128))
    assert isinstance(tokens, nn.Linear) and tokens(torch.randn(2, 5, 16)).shape == (2, 5, 128)


def test_module_heads_are_used_and_checked() -> None:
    class WithHead(nn.Module):
        def pipeline_aux_head(self, stage_index: int, sample_output: torch.Tensor) -> nn.Module | None:
            return nn.Sequential(nn.Flatten(), nn.LazyLinear(3)) if stage_index == 0 else None

    heads = build_aux_heads(WithHead(), [torch.randn(2, 4, 2, 2), torch.randn(2, 6)], torch.randn(2, 3))
    assert isinstance(heads[0][1], nn.Linear) and isinstance(heads[1], nn.Linear)

    class WrongShape(nn.Module):
        def pipeline_aux_head(self, stage_index: int, sample_output: torch.Tensor) -> nn.Module:
            return nn.Linear(6, 4)

    with pytest.raises(ValueError, match=r"auxiliary head of stage 0 maps its output \(2, 6\) to \(2, 4\)"):
        build_aux_heads(WrongShape(), [torch.randn(2, 6)], torch.randn(2, 3))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: check_width(0, 4), r"k=0 must be an integer with 1 <= k <= stages=4"),
        (lambda: InterlockingPlan(4, 5), r"k=5 must be an integer with 1 <= k <= stages=4"),
        (lambda: InterlockingPlan(0, 1), r"stages=0 must be >= 1"),
        (lambda: outer_first_partition(3, 4), r"3 blocks cannot fill stages=4"),
        (lambda: check_partition([1, 2], 6, 2), r"partition=\[1, 2\] covers 3 blocks but the model has 6"),
        (lambda: split_trunk(tiny_model(), 2, image_batches(1)[0], partition="profile"), r"partition='profile' is not"),
        (lambda: stages_of_rank(0, 3, 4), r"stages=4 must be a multiple of the world size \(3 processes\)"),
        (
            lambda: default_aux_head(2, torch.randn(2, 1, 3, 4, 4), torch.randn(2, 10)),
            r"No default auxiliary head for stage 2: its output has shape \(2, 1, 3, 4, 4\)",
        ),
        (
            lambda: default_aux_head(1, torch.zeros(2, 5, dtype=torch.long), torch.randn(2, 10)),
            r"implement `pipeline_aux_head\(stage_index, sample_output\)`",
        ),
    ],
)
def test_bad_input(call: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_a_stage_whose_loss_is_needed_must_have_a_head() -> None:
    model, batch = tiny_model(), image_batches()[0]
    stage_blocks, heads = split_trunk(model, 4, batch)
    with pytest.raises(ValueError, match=r"Stage 1 has no auxiliary head but its loss updates stage 0"):
        InterlockingRuntime(
            InterlockingPlan(4, 2),
            stage_blocks,
            [heads[0], None, heads[2]],
            model.pipeline_input,
            model.pipeline_loss,
        )
    # end-to-end needs no heads at all
    InterlockingRuntime(
        InterlockingPlan(4, 4), stage_blocks, [None] * 3, model.pipeline_input, model.pipeline_loss
    )
