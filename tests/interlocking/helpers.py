"""A small pure-torch model implementing the pipeline protocol, and the interlocking training loops of the tests.

Kept free of Lightning so that spawned test processes start fast.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_parallel.interlocking.heads import split_trunk
from lightning_parallel.interlocking.plan import InterlockingPlan
from lightning_parallel.interlocking.runtime import InterlockingRuntime
from lightning_parallel.pipeline.micro_batches import split_micro_batches

MICRO = 4


class TinyConvNet(nn.Module):
    """Stem, three strided conv blocks, pool + linear head (6 blocks) on (B, 1, 8, 8) images."""

    def __init__(self, widths: tuple[int, ...] = (4, 8, 16, 32), num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(1, widths[0], 3, padding=1), nn.GroupNorm(2, widths[0]), nn.ReLU())
        ]
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            layers.append(
                nn.Sequential(
                    nn.Conv2d(a, b, 3, stride=2 if i < 2 else 1, padding=1), nn.GroupNorm(2, b), nn.ReLU()
                )
            )
        layers.append(
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes))
        )
        self.blocks = nn.Sequential(*layers)

    def pipeline_blocks(self) -> nn.Sequential:
        return self.blocks

    def pipeline_input(self, batch: Any) -> torch.Tensor:
        return batch[0]

    def pipeline_loss(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        return F.cross_entropy(output, batch[1])

    def pipeline_metrics(self, output: torch.Tensor, batch: Any) -> dict[str, torch.Tensor]:
        return {
            "loss": F.cross_entropy(output, batch[1]),
            "acc": (output.argmax(-1) == batch[1]).float().mean(),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def tiny_model(seed: int = 0) -> TinyConvNet:
    torch.manual_seed(seed)
    return TinyConvNet()


def image_batches(seed: int = 1, steps: int = 3, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 1, 8, 8, generator=gen), torch.randint(0, 10, (size,), generator=gen))
        for _ in range(steps)
    ]


def stages_and_heads(model: Any, stages: int, batch: Any) -> tuple[list[nn.Sequential], list[nn.Module]]:
    """Split the trunk; the heads get a fixed initialisation, the same in every reference."""
    stage_blocks, heads = split_trunk(model, stages, batch)
    torch.manual_seed(123)
    for head in heads:
        for p in head.parameters():
            nn.init.normal_(p, std=0.1)
    return stage_blocks, heads


def train_interlocking(
    model: Any, k: int, stages: int, batches: list[Any], rank: int = 0, world_size: int = 1
) -> nn.ModuleList:
    """Train with the runtime and Adam; return the trunk stages then the heads (only held ones are trained)."""
    stage_blocks, heads = stages_and_heads(model, stages, batches[0])
    runtime = InterlockingRuntime(
        InterlockingPlan(stages, k),
        stage_blocks,
        heads,
        model.pipeline_input,
        model.pipeline_loss,
        rank=rank,
        world_size=world_size,
        timeout_s=60,
    )
    everything = nn.ModuleList([*stage_blocks, *heads])
    optimizer = torch.optim.Adam(everything.parameters(), lr=1e-2)
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        runtime.train_step(split_micro_batches(batch, MICRO))
        optimizer.step()
    runtime.finish()
    return everything


def distributed_worker(rank: int, world_size: int, k: int, stages: int) -> dict[str, Any]:
    """Train the tiny model on this rank's stages; return the held stages' and heads' parameters (numpy)."""
    torch.set_num_threads(1)
    trained = train_interlocking(tiny_model(), k, stages, image_batches(), rank=rank, world_size=world_size)
    return {name: value.numpy() for name, value in held_parameters(trained, rank, world_size, stages).items()}


def held_parameters(
    trained: nn.ModuleList, rank: int, world_size: int, stages: int
) -> dict[str, torch.Tensor]:
    per_rank = stages // world_size
    held = [*range(rank * per_rank, (rank + 1) * per_rank)]
    indices = held + [stages + s for s in held if s < stages - 1]
    return {f"{i}.{n}": p.detach().clone() for i in indices for n, p in trained[i].named_parameters()}
