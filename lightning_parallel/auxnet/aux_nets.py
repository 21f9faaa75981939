"""Auxiliary networks: a module's own (``pipeline_aux_net``) or a small default map from the input.

Stage ``s >= 1`` gets an auxiliary network ``a_s`` mapping the trunk's input ``x = pipeline_input(batch)`` to a
tensor shaped like the stage's input (the output of stage ``s - 1``). A module may provide its own through the
optional pipeline-protocol hook ``pipeline_aux_net(stage_index, sample_input, sample_stage_input)`` (return
``None`` for the default). Defaults, built from one sample (low capacity on purpose: the auxiliary network must
be much cheaper than the trunk prefix it stands in for, or there is nothing to gain):

- image to image, ``(B, C, H, W) -> (B, C', H', W')``: ``Conv2d(C, C', 2r + 1, stride=r, padding=r)``, ReLU,
  ``Conv2d(C', C', 1)`` with ``r = H // H'`` (an adaptive average pool fixes sizes that ``r`` does not divide);
- anything else with a floating-point input: flatten, ``Linear(numel(x), numel(z))``, unflatten (for flat
  features, ``(B, F) -> (B, F')``, this is one linear layer).

Integer inputs (token ids) have no default: the hook must provide one (for example an embedding).
This module imports no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_parallel.interlocking.heads import cut_trunk


def default_aux_net(
    stage_index: int, sample_input: torch.Tensor, sample_stage_input: torch.Tensor
) -> nn.Module:
    """The default auxiliary network of stage ``stage_index``.

    Args:
        stage_index: the stage whose input the network produces (>= 1), named in errors.
        sample_input: a batch of the trunk's input.
        sample_stage_input: the stage's input for the same batch (the previous stage's output).

    Raises:
        ValueError: if the trunk's input is not floating point.
    """
    x, z = sample_input, sample_stage_input
    if not x.is_floating_point():
        raise ValueError(
            f"No default auxiliary network for stage {stage_index}: the trunk's input is {x.dtype} "
            f"{tuple(x.shape)} (token ids?). Implement `pipeline_aux_net(stage_index, sample_input, "
            "sample_stage_input)` on the module to return an nn.Module mapping the input to a tensor of shape "
            f"{tuple(z.shape)}, e.g. an embedding followed by a linear layer."
        )
    if x.dim() == 4 and z.dim() == 4:
        channels = z.shape[1]
        ratio = max(1, x.shape[2] // z.shape[2])
        layers: list[nn.Module] = [
            nn.Conv2d(x.shape[1], channels, 2 * ratio + 1, stride=ratio, padding=ratio),
            nn.GroupNorm(math.gcd(8, channels), channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        ]
        if x.shape[2] % z.shape[2] or x.shape[3] % z.shape[3] or x.shape[3] // z.shape[3] != ratio:
            layers.append(nn.AdaptiveAvgPool2d(tuple(z.shape[2:])))
        return nn.Sequential(*layers)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(x[0].numel(), z[0].numel()), nn.Unflatten(1, tuple(z.shape[1:]))
    )


def build_aux_nets(
    module: Any, sample_input: torch.Tensor, stage_inputs: Sequence[torch.Tensor]
) -> list[nn.Module]:
    """One auxiliary network per stage but the first: the module's own where it provides one, else the default.

    Args:
        module: the model (may implement ``pipeline_aux_net(stage_index, sample_input, sample_stage_input)``).
        sample_input: a batch of the trunk's input.
        stage_inputs: the input of stages ``1 .. S - 1`` for that batch.

    Returns:
        ``S - 1`` networks; entry ``s - 1`` belongs to stage ``s``.

    Raises:
        TypeError: if the hook returns something other than a module or ``None``.
        ValueError: if a network's output shape differs from its stage's input shape.
    """
    hook = getattr(module, "pipeline_aux_net", None)
    nets: list[nn.Module] = []
    for stage, sample in enumerate(stage_inputs, start=1):
        net = hook(stage, sample_input, sample) if callable(hook) else None
        if net is None:
            net = default_aux_net(stage, sample_input, sample)
        elif not isinstance(net, nn.Module):
            raise TypeError(
                f"pipeline_aux_net({stage}, ...) returned {type(net).__name__}; it must return an nn.Module "
                "or None (for the default auxiliary network)."
            )
        with torch.no_grad():
            produced = net(sample_input)
        if tuple(produced.shape) != tuple(sample.shape):
            raise ValueError(
                f"The auxiliary network of stage {stage} maps the input {tuple(sample_input.shape)} to "
                f"{tuple(produced.shape)}, but the stage's input has shape {tuple(sample.shape)}; return a "
                "network from `pipeline_aux_net` that produces that shape."
            )
        nets.append(net)
    return nets


def split_trunk_with_aux_nets(
    module: Any, stages: int, sample_batch: Any, *, partition: str | Sequence[int] | None = None
) -> tuple[list[nn.Sequential], list[nn.Module]]:
    """Cut a pipeline-protocol module's blocks into stages and build the auxiliary networks of stages ``1 ..``.

    The stages are cut as interlocking backprop cuts them (:func:`~lightning_parallel.interlocking.heads.cut_trunk`)
    and share their parameters with ``module``; the auxiliary networks are new modules (the Lightning strategy
    attaches them to the module so that optimizers and checkpoints see them).

    Args:
        module: a module implementing the pipeline protocol.
        stages: the number of stages ``S``.
        sample_batch: a (micro-)batch used to infer the stage inputs' shapes.
        partition: blocks per stage, as for :func:`~lightning_parallel.interlocking.heads.split_trunk`.
    """
    stage_blocks, outputs = cut_trunk(module, stages, sample_batch, partition=partition)
    return stage_blocks, build_aux_nets(module, module.pipeline_input(sample_batch), outputs[:-1])
