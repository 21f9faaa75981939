"""Auxiliary heads of interlocking backprop: a module's own heads, or a default pool + linear head.

Every stage but the last needs a head mapping the stage's output to a prediction of the same shape as the
model's final output, so that the model's ``pipeline_loss`` (and ``pipeline_metrics``) apply to it unchanged.
A module may provide heads through the pipeline protocol's optional hook
``pipeline_aux_head(stage_index, sample_output) -> nn.Module | None``; where it returns ``None`` (or lacks
the hook) the default head is used:

- image features ``(B, C, H, W)``: global average pool, flatten, linear ``C -> out_features``;
- token features ``(B, T, C)``: linear ``C -> out_features`` on every token;
- flat features ``(B, C)``: linear ``C -> out_features``.

``out_features`` is the size of the last dimension of the model's final output (classes, or the vocabulary).
This module imports no Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_parallel.pipeline.partition import outer_first_partition, partition_blocks, stage_slices
from lightning_parallel.pipeline.stage_local import has_meta_tensors, meta_outputs


def default_aux_head(stage_index: int, sample_output: torch.Tensor, final_output: torch.Tensor) -> nn.Module:
    """The default auxiliary head for a stage whose output looks like ``sample_output``.

    Args:
        stage_index: the stage, named in errors.
        sample_output: an output of the stage (batch first).
        final_output: an output of the whole trunk for the same input (gives the head's output shape).

    Raises:
        ValueError: if no default head fits the stage output's shape.
    """
    shape, final = tuple(sample_output.shape), tuple(final_output.shape)
    out_features = final[-1]
    if sample_output.is_floating_point() and sample_output.dim() == 4 and len(final) == 2:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(shape[1], out_features))
    if sample_output.is_floating_point() and sample_output.dim() == 3 and final[:2] == shape[:2]:
        return nn.Linear(shape[2], out_features)
    if sample_output.is_floating_point() and sample_output.dim() == 2 and len(final) == 2:
        return nn.Linear(shape[1], out_features)
    raise ValueError(
        f"No default auxiliary head for stage {stage_index}: its output has shape {shape} "
        f"({sample_output.dtype}) and the model's final output has shape {final}. Defaults exist for image "
        "features (B, C, H, W) with a (B, classes) output, token features (B, T, C) with a (B, T, V) output and "
        "flat features (B, C); implement `pipeline_aux_head(stage_index, sample_output)` on the module to "
        "return a head for this stage, or choose stage boundaries (partition) whose outputs have such a shape."
    )


def build_aux_heads(
    module: Any, stage_outputs: Sequence[torch.Tensor], final_output: torch.Tensor
) -> list[nn.Module]:
    """One auxiliary head per stage but the last: the module's own where it provides one, else the default.

    Args:
        module: the model (may implement ``pipeline_aux_head(stage_index, sample_output)``).
        stage_outputs: a sample output of every stage but the last.
        final_output: the trunk's output for the same input.

    Raises:
        ValueError: if a head's output shape differs from the final output's.
    """
    hook = getattr(module, "pipeline_aux_head", None)
    heads: list[nn.Module] = []
    for index, sample in enumerate(stage_outputs):
        head = hook(index, sample) if callable(hook) else None
        if head is None:
            head = default_aux_head(index, sample, final_output)
        elif not isinstance(head, nn.Module):
            raise TypeError(
                f"pipeline_aux_head({index}, ...) returned {type(head).__name__}; it must return an nn.Module "
                "or None (for the default head)."
            )
        with torch.no_grad():
            was_training = head.training
            head.eval()
            produced = head(sample)
            head.train(was_training)
        if tuple(produced.shape) != tuple(final_output.shape):
            raise ValueError(
                f"The auxiliary head of stage {index} maps its output {tuple(sample.shape)} to "
                f"{tuple(produced.shape)}, but the loss expects the final output's shape "
                f"{tuple(final_output.shape)}; return a head from `pipeline_aux_head` that produces that shape."
            )
        heads.append(head)
    return heads


def split_trunk(
    module: Any, stages: int, sample_batch: Any, *, partition: str | Sequence[int] | None = None
) -> tuple[list[nn.Sequential], list[nn.Module]]:
    """Cut a pipeline-protocol module's blocks into stages and build the auxiliary heads.

    The stages share their parameters with ``module``; the heads are new modules (the caller decides where
    they live: the Lightning strategy attaches them to the module so that optimizers and checkpoints see them).

    Args:
        module: a module implementing the pipeline protocol.
        stages: the number of stages ``S``.
        sample_batch: a (micro-)batch used to infer the stage outputs' shapes.
        partition: blocks per stage: ``None`` (default) for equal counts with the leftovers to the outer
            stages first (:func:`~lightning_parallel.pipeline.partition.outer_first_partition`), else any
            ``method`` of :func:`~lightning_parallel.pipeline.partition.partition_blocks` but ``"profile"``
            (``"uniform"``, ``"parameters"``, or explicit block counts such as ``[2, 1, 1, 2]``).

    Returns:
        The blocks of each stage and the ``S - 1`` auxiliary heads.
    """
    stage_blocks, samples = cut_trunk(module, stages, sample_batch, partition=partition)
    return stage_blocks, build_aux_heads(module, samples[:-1], samples[-1])


def cut_trunk(
    module: Any, stages: int, sample_batch: Any, *, partition: str | Sequence[int] | None = None
) -> tuple[list[nn.Sequential], list[torch.Tensor]]:
    """Cut a pipeline-protocol module's blocks into stages and run one sample through them.

    The stages share their parameters with ``module``. The sample runs in eval mode without autograd (the
    modules' modes are restored), so it changes no state. A module with tensors on the meta device (built
    in ``configure_model`` for stage-local weights) runs on meta, and its stage outputs are zeros of the
    shapes found.

    Args:
        module: a module implementing the pipeline protocol.
        stages: the number of stages ``S``.
        sample_batch: a (micro-)batch used to infer the stage outputs.
        partition: blocks per stage, as for :func:`split_trunk`.

    Returns:
        The blocks of each stage and each stage's output on the sample.
    """
    blocks = list(module.pipeline_blocks())
    if partition is None:
        sizes = outer_first_partition(len(blocks), stages)
    elif partition == "profile":
        raise ValueError(
            "partition='profile' is not supported by interlocking backprop (every process would measure its own "
            "partition); use 'uniform', 'parameters' or explicit block counts."
        )
    else:
        sizes = partition_blocks(blocks, stages, partition)
    stage_blocks = [nn.Sequential(*blocks[block_slice]) for block_slice in stage_slices(sizes)]
    x = module.pipeline_input(sample_batch)
    modes = [m.training for m in module.modules()] if isinstance(module, nn.Module) else []
    samples = []
    try:
        with torch.no_grad():
            if isinstance(module, nn.Module):
                module.eval()
            if has_meta_tensors(stage_blocks):
                # Built on the meta device: the shapes come from a meta run, the samples are zeros of them.
                device = x.device
                samples = [torch.zeros(out.shape, dtype=out.dtype, device=device) for out in meta_outputs(stage_blocks, x)]
            else:
                for stage in stage_blocks:
                    x = stage(x)
                    samples.append(x)
    finally:
        if isinstance(module, nn.Module):
            for sub, mode in zip(module.modules(), modes):
                sub.training = mode
    return stage_blocks, samples
