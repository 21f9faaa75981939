"""Per-stage activation recomputation: which stages, what it stores, and that gradients do not change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_parallel.pipeline.recompute import RecomputedStage, recompute_stages
from lightning_parallel.pipeline.schedule import build_schedule


def test_the_default_picks_the_stages_that_store_the_most() -> None:
    # 1F1B: rank r stores D - r micro-batches at once, so stage 0 is the one.
    assert recompute_stages(build_schedule("1f1b", 4, 8), True) == {0}
    # GPipe stores every micro-batch on every rank: all stages tie.
    assert recompute_stages(build_schedule("gpipe", 4, 8), True) == {0, 1, 2, 3}
    assert recompute_stages(build_schedule("1f1b", 4, 8), False) == set()
    assert recompute_stages(build_schedule("1f1b", 4, 8), [1, 3]) == {1, 3}
    with pytest.raises(ValueError, match=r"recompute=\[4\] names stages \[4\]"):
        recompute_stages(build_schedule("1f1b", 4, 8), [4])


def _saved_bytes(module: nn.Module, x: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    out.pow(2).sum().backward()
    return total, [p.grad.clone() for p in module.parameters()]  # type: ignore[union-attr]


def test_a_recomputed_stage_stores_only_its_input_and_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    stage = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Dropout(0.5), nn.Linear(64, 32))
    x = torch.randn(8, 32, requires_grad=True)
    torch.manual_seed(1)
    plain_bytes, plain_grads = _saved_bytes(stage, x)
    stage.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout mask: checkpoint replays the random state in backward
    wrapped_bytes, wrapped_grads = _saved_bytes(RecomputedStage(stage), x)
    assert wrapped_bytes == x.numel() * x.element_size()
    assert plain_bytes > 4 * wrapped_bytes
    for a, b in zip(plain_grads, wrapped_grads):
        torch.testing.assert_close(a, b)
