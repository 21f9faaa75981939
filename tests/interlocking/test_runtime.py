"""Interlocking execution against independent references: end-to-end, local learning, explicit windows."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lightning_parallel.models import MLPClassifier, ResNetClassifier
from lightning_parallel.pipeline.micro_batches import split_micro_batches
from lightning_parallel.pipeline.protocol import run_blocks
from tests.helpers.distributed import run_distributed
from tests.interlocking.helpers import (
    MICRO,
    distributed_worker,
    held_parameters,
    image_batches,
    stages_and_heads,
    tiny_model,
    train_interlocking,
)


def _window_reference(model: Any, k: int, stages: int, batches: list[Any]) -> nn.ModuleList:
    """The definition: stage j's gradient is d loss_target(j) / d theta_j, recomputed from its detached input."""
    stage_blocks, heads = stages_and_heads(model, stages, batches[0])
    everything = nn.ModuleList([*stage_blocks, *heads])
    optimizer = torch.optim.Adam(everything.parameters(), lr=1e-2)
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        for mb in split_micro_batches(batch, MICRO):
            with torch.no_grad():
                acts = [model.pipeline_input(mb)]
                for stage in stage_blocks:
                    acts.append(stage(acts[-1]))
            for j in range(stages):
                target = min(j + k - 1, stages - 1)
                out = run_blocks(stage_blocks[j : target + 1], acts[j].detach())
                pred = out if target == stages - 1 else heads[target](out)
                loss = model.pipeline_loss(pred, mb) / MICRO
                grads = torch.autograd.grad(loss, list(stage_blocks[j].parameters()))
                for p, g in zip(stage_blocks[j].parameters(), grads):
                    p.grad = g if p.grad is None else p.grad + g
            for i, head in enumerate(heads):
                (model.pipeline_loss(head(acts[i + 1].detach()), mb) / MICRO).backward()
        optimizer.step()
    return everything


def _local_reference(model: Any, stages: int, batches: list[Any]) -> nn.ModuleList:
    """Local learning: every stage trained by its own head (the last by the true loss), inputs detached."""
    stage_blocks, heads = stages_and_heads(model, stages, batches[0])
    everything = nn.ModuleList([*stage_blocks, *heads])
    optimizer = torch.optim.Adam(everything.parameters(), lr=1e-2)
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        for mb in split_micro_batches(batch, MICRO):
            x = model.pipeline_input(mb)
            for j, stage in enumerate(stage_blocks):
                out = stage(x.detach())
                pred = out if j == stages - 1 else heads[j](out)
                (model.pipeline_loss(pred, mb) / MICRO).backward()
                x = out
        optimizer.step()
    return everything


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_k_equals_stages_is_end_to_end_training_of_the_resnet() -> None:
    torch.manual_seed(0)
    model = ResNetClassifier(widths=(4, 8, 16, 32), norm="group")
    torch.manual_seed(0)
    reference = ResNetClassifier(widths=(4, 8, 16, 32), norm="group")
    batches = image_batches()
    train_interlocking(model, 4, 4, batches)
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-2)
    for batch in batches:  # whole batch at once: GroupNorm makes micro-batching exact
        optimizer.zero_grad()
        reference.pipeline_loss(reference(batch[0]), batch).backward()
        optimizer.step()
    assert _max_diff(model, reference) < 1e-5
    torch.manual_seed(0)
    assert _max_diff(model, ResNetClassifier(widths=(4, 8, 16, 32), norm="group")) > 1e-3  # it trained


def test_k1_is_local_learning() -> None:
    batches = image_batches()
    trained = train_interlocking(tiny_model(), 1, 4, batches)
    reference = _local_reference(tiny_model(), 4, batches)
    assert _max_diff(trained, reference) < 1e-6


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_every_width_matches_the_explicit_window_definition(k: int) -> None:
    batches = image_batches()
    trained = train_interlocking(tiny_model(), k, 4, batches)
    reference = _window_reference(tiny_model(), k, 4, batches)
    assert _max_diff(trained, reference) < 1e-5


def test_widths_give_different_parameters() -> None:
    batches = image_batches()
    k2, k3 = train_interlocking(tiny_model(), 2, 4, batches), train_interlocking(tiny_model(), 3, 4, batches)
    assert _max_diff(k2[:4], k3[:4]) > 1e-4


def test_flat_features_with_linear_heads() -> None:
    def mlp() -> MLPClassifier:
        torch.manual_seed(0)
        return MLPClassifier(in_features=12, hidden=(16, 16, 16), num_classes=5)

    gen = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(8, 12, generator=gen), torch.randint(0, 5, (8,), generator=gen)) for _ in range(2)
    ]
    trained = train_interlocking(mlp(), 2, 4, batches)
    assert isinstance(trained[4], nn.Linear)
    assert _max_diff(trained, _window_reference(mlp(), 2, 4, batches)) < 1e-5


@pytest.mark.parametrize(("k", "world_size"), [(2, 4), (3, 2)])
def test_distributed_equals_single_process(k: int, world_size: int) -> None:
    stages = 4
    results = run_distributed(distributed_worker, world_size, k, stages, timeout=150)
    torch.set_num_threads(1)  # as in the workers: same kernels, so the same rounding
    single = train_interlocking(tiny_model(), k, stages, image_batches())
    for rank, params in enumerate(results):
        expected = held_parameters(single, rank, world_size, stages)
        assert expected.keys() == params.keys()
        for name, value in params.items():
            torch.testing.assert_close(
                torch.from_numpy(value), expected[name], rtol=0, atol=1e-6, msg=f"rank {rank} {name}"
            )
