"""Training loops of the AuxNet engine shared by the tests and their spawned workers (no Lightning)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_parallel.auxnet import AuxNetOptions, AuxNetRuntime, split_trunk_with_aux_nets
from lightning_parallel.pipeline.micro_batches import split_micro_batches as split_batch
from tests.interlocking.helpers import image_batches, tiny_model

MICRO = 4
STAGES = 4


def build(
    model: Any, options: AuxNetOptions, batch: Any, rank: int = 0, world_size: int = 1
) -> AuxNetRuntime:
    """Split ``model`` into 4 stages with default auxiliary networks (fixed initialisation) and a runtime."""
    stage_blocks, aux_nets = split_trunk_with_aux_nets(model, STAGES, batch)
    torch.manual_seed(321)
    for net in aux_nets:
        for p in net.parameters():
            nn.init.normal_(p, std=0.2)
    return AuxNetRuntime(
        stage_blocks,
        aux_nets,
        model.pipeline_input,
        model.pipeline_loss,
        options,
        rank=rank,
        world_size=world_size,
        timeout_s=60,
    )


def train(options: AuxNetOptions, rank: int = 0, world_size: int = 1) -> tuple[AuxNetRuntime, list[int]]:
    """Three Adam steps of the tiny conv net; returns the runtime and the bytes this rank sent per step."""
    batches = image_batches()
    runtime = build(tiny_model(), options, batches[0], rank, world_size)
    params = [p for s in runtime.held for p in runtime.stage_blocks[s].parameters()]
    params += [p for s in runtime.held if s > 0 for p in runtime.aux_nets[s - 1].parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    sent = []
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        runtime.train_step(split_batch(batch, MICRO))
        optimizer.step()
        sent.append(runtime.last_step_bytes)
    runtime.finish()
    return runtime, sent


def held_state(runtime: AuxNetRuntime) -> dict[str, torch.Tensor]:
    """The held stages' and auxiliary networks' parameters, the multipliers of the held stages' inputs."""
    state = {}
    for s in runtime.held:
        state.update(
            {f"stage{s}.{n}": p.detach().clone() for n, p in runtime.stage_blocks[s].named_parameters()}
        )
        if s > 0:
            state.update(
                {f"aux{s}.{n}": p.detach().clone() for n, p in runtime.aux_nets[s - 1].named_parameters()}
            )
    for b, value in runtime.state_dict()["multipliers"].items():
        state[f"lambda{b}"] = value.clone()
    return state


def distributed_worker(
    rank: int, world_size: int, options: AuxNetOptions
) -> tuple[dict[str, Any], list[int]]:
    torch.set_num_threads(1)
    runtime, sent = train(options, rank, world_size)
    return {k: v.numpy() for k, v in held_state(runtime).items()}, sent
