"""The pipeline protocol: how a module exposes an ordered trunk and a loss.

A LightningModule (or any ``nn.Module``) opts in to the pipeline strategies by implementing
three hooks. The same module keeps training unchanged on one device or under DDP, because its
``training_step`` is written in terms of the hooks::

    out = self.pipeline_input(batch)
    for block in self.pipeline_blocks():
        out = block(out)
    loss = self.pipeline_loss(out, batch)

Vocabulary (used across the package):

- *block*: one entry of :meth:`pipeline_blocks`; the output of block i is the input of block i+1.
- *stage*: a contiguous run of blocks placed on one rank.
- *micro-batch*: a slice of the batch along dimension 0 of every tensor in it (cut by
  :mod:`lightning_parallel.pipeline.micro_batches`).
- *replica*: one copy of the whole pipeline (Chimera runs two, "down" and "up").

Optional hooks:

- ``pipeline_metrics(output, batch) -> dict[str, Tensor]``: metrics of the last block's output
  (for example ``{"loss": ..., "acc": ...}``), used by the strategies for validation and test.
- ``pipeline_aux_head(stage_index, sample_output) -> nn.Module | None``: an auxiliary head that
  maps a stage's output to the task's prediction (interlocking backprop).

This module imports no Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

REQUIRED_HOOKS = ("pipeline_blocks", "pipeline_input", "pipeline_loss")


@runtime_checkable
class PipelineProtocol(Protocol):
    """A module that exposes its ordered blocks, the blocks' input and the loss."""

    def pipeline_blocks(self) -> Sequence[nn.Module]:
        """The ordered blocks (an ``nn.Sequential`` or ``nn.ModuleList``)."""
        ...

    def pipeline_input(self, batch: Any) -> torch.Tensor:
        """The first block's input, taken from a (micro-)batch."""
        ...

    def pipeline_loss(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        """The scalar loss, averaged over the examples of ``batch``, of the last block's output."""
        ...


def missing_pipeline_hooks(module: object) -> list[str]:
    """Names of the required hooks that ``module`` lacks (empty if it implements the protocol)."""
    return [name for name in REQUIRED_HOOKS if not callable(getattr(module, name, None))]


def check_pipeline_protocol(module: object, *, who: str) -> None:
    """Raise a ``TypeError`` naming the hooks to add when ``module`` lacks the pipeline protocol.

    Args:
        module: the model handed to a strategy.
        who: the class that needs the protocol, named in the message.
    """
    missing = missing_pipeline_hooks(module)
    if missing:
        raise TypeError(
            f"{who} needs a module that implements the pipeline protocol; "
            f"{type(module).__name__} lacks {', '.join(missing)}. Add `pipeline_blocks()` (the ordered "
            "blocks, an nn.Sequential), `pipeline_input(batch)` (the first block's input) and "
            "`pipeline_loss(output, batch)` (the loss of the last block's output); see the README's "
            "'Pipeline protocol' section. Or let the strategy supply them without touching the module: "
            "blocks='model.layers' (an nn.Sequential/nn.ModuleList trunk, with pre=, post=, loss=), adapter='hf' "
            "(a Hugging Face causal LM) or adapter='traced' (split a traceable module); see docs/models.md."
        )


def run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Apply ``blocks`` in order."""
    for block in blocks:
        x = block(x)
    return x
