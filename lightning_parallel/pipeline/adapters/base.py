"""PipelineAdapter: gives a module that does not implement the pipeline protocol one, from outside.

The pipeline strategies read the protocol's hooks off the LightningModule (``pipeline_blocks``,
``pipeline_input``, ``pipeline_loss`` and the optional ``pipeline_metrics`` / ``pipeline_init_weights`` /
``pipeline_aux_head``; see :mod:`lightning_parallel.pipeline.protocol`). An adapter supplies them for a
module that has none, so the user's class stays as it was written:

- :meth:`PipelineAdapter.prepare` runs once, in the strategy's ``setup``, after ``configure_model`` and before
  any hook is read; it finds the trunk (and, for a traced adapter, may trace it from ``sample_batch()``, one
  batch of the run's dataloader, fetched only when called).
- :meth:`PipelineAdapter.pipeline_blocks` returns the ordered blocks. Blocks are ``nn.Module`` objects whose
  parameters are the module's own (wrappers hold the module's submodules, they never copy them), so
  ``state_dict`` names, checkpoints and ``load_from_checkpoint`` stay the user's.
- Exactly one tensor travels between stages (the runtime's contract). Anything else a block needs is either
  recomputed from that tensor (a causal mask and positions from the sequence length) or carried inside it
  (:func:`pack_channels` / :func:`unpack_channels` append per-token values as extra trailing channels, whose
  gradient is zero).
- :meth:`PipelineAdapter.pipeline_input` / :meth:`PipelineAdapter.pipeline_loss` are the protocol's, given
  the module; ``pipeline_metrics`` is installed only when a subclass overrides it.

:func:`install_adapter` writes bound hooks into the module's instance ``__dict__`` (nothing on the class,
nothing in ``state_dict``), and records the adapter under :data:`ADAPTER_ATTRIBUTE`; a module that got its
hooks this way can be given another adapter later, a module with hooks of its own is never overwritten.

This module imports no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

ADAPTER_ATTRIBUTE = "_pipeline_adapter"
"""The instance attribute under which :func:`install_adapter` records the adapter of a module."""

_HOOKS = ("pipeline_blocks", "pipeline_input", "pipeline_loss")
_OPTIONAL_HOOKS = ("pipeline_metrics", "pipeline_init_weights", "pipeline_aux_head")

SampleBatch = Callable[[], Any]


class PipelineAdapter:
    """The pipeline protocol of a module, supplied from outside the module.

    Subclasses implement :meth:`pipeline_blocks`, :meth:`pipeline_input` and :meth:`pipeline_loss`, and may
    override :meth:`prepare`, :meth:`pipeline_metrics`, :meth:`pipeline_init_weights` and :meth:`describe`.
    """

    name: str = "adapter"
    """Short name, used in messages and in ``ChimeraStrategy(adapter=...)``."""

    def prepare(self, module: nn.Module, *, sample_batch: SampleBatch) -> None:
        """Find (or build) the trunk of ``module``; called once by the strategy's ``setup``.

        Args:
            module: the LightningModule, after ``configure_model``.
            sample_batch: returns one batch of the run's dataloader when called (random state untouched).

        Raises:
            ValueError: if the module does not have the shape the adapter expects (message names the fix).
        """

    def pipeline_blocks(self, module: nn.Module) -> Sequence[nn.Module]:
        """The ordered blocks: the output of block i is the input of block i+1."""
        raise NotImplementedError(f"{type(self).__name__} must implement pipeline_blocks.")

    def pipeline_input(self, module: nn.Module, batch: Any) -> Tensor:
        """The first block's input, taken from a (micro-)batch."""
        raise NotImplementedError(f"{type(self).__name__} must implement pipeline_input.")

    def pipeline_loss(self, module: nn.Module, output: Tensor, batch: Any) -> Tensor:
        """The scalar loss, averaged over the examples of ``batch``, of the last block's output."""
        raise NotImplementedError(f"{type(self).__name__} must implement pipeline_loss.")

    def pipeline_metrics(self, module: nn.Module, output: Tensor, batch: Any) -> Mapping[str, Tensor]:
        """Metrics of the last block's output (installed only when a subclass overrides this)."""
        raise NotImplementedError

    def pipeline_init_weights(self, module: nn.Module, index: int, block: nn.Module) -> None:
        """Initialise block ``index`` built on the meta device (installed only when a subclass overrides this)."""
        raise NotImplementedError

    def pipeline_aux_head(self, module: nn.Module, stage_index: int, sample_output: Tensor) -> nn.Module | None:
        """Interlocking backprop's auxiliary head of a stage (installed only when a subclass overrides this)."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line naming the adapter and its trunk, for messages and logs."""
        return type(self).__name__


def _overrides(adapter: PipelineAdapter, name: str) -> bool:
    return getattr(type(adapter), name) is not getattr(PipelineAdapter, name)


def _bind(adapter: PipelineAdapter, name: str, module: nn.Module) -> Callable[..., Any]:
    method = getattr(adapter, name)

    def hook(*args: Any) -> Any:
        return method(module, *args)

    hook.__name__ = name
    hook.__doc__ = f"{name} supplied by {adapter.describe()}."
    return hook


def adapted_by(module: nn.Module) -> PipelineAdapter | None:
    """The adapter :func:`install_adapter` gave ``module``, or ``None``."""
    adapter = module.__dict__.get(ADAPTER_ATTRIBUTE)
    return adapter if isinstance(adapter, PipelineAdapter) else None


def install_adapter(module: nn.Module, adapter: PipelineAdapter, *, sample_batch: SampleBatch) -> None:
    """Prepare ``adapter`` on ``module`` and write the protocol's hooks into the module instance.

    Args:
        module: the module to give the protocol (after ``configure_model``).
        adapter: what supplies the hooks.
        sample_batch: one batch of the run's data, fetched only if the adapter calls it.

    Raises:
        TypeError: if ``module`` implements a hook itself (its own hooks win; drop the adapter options).
    """
    previous = adapted_by(module)
    if previous is not None:
        for name in (*_HOOKS, *_OPTIONAL_HOOKS):
            module.__dict__.pop(name, None)
    own = [name for name in _HOOKS if callable(getattr(module, name, None))]
    if own:
        raise TypeError(
            f"{type(module).__name__} implements {', '.join(own)} itself, and {adapter.describe()} was given as "
            "well; drop the strategy's adapter/blocks options to use the module's own hooks."
        )
    adapter.prepare(module, sample_batch=sample_batch)
    for name in _HOOKS:
        module.__dict__[name] = _bind(adapter, name, module)
    for name in _OPTIONAL_HOOKS:
        if _overrides(adapter, name) and not callable(getattr(module, name, None)):
            module.__dict__[name] = _bind(adapter, name, module)
    module.__dict__[ADAPTER_ATTRIBUTE] = adapter


def pack_channels(hidden: Tensor, *extra: Tensor) -> Tensor:
    """Append per-token tensors ``(B, T)`` to ``hidden`` ``(B, T, C)`` as trailing channels ``(B, T, C + k)``.

    The values travel with the activation between stages (in its dtype: use it for masks and small integers;
    bf16 holds integers exactly only up to 256).
    """
    if not extra:
        return hidden
    columns = [e.to(hidden.dtype).unsqueeze(-1) for e in extra]
    return torch.cat([hidden, *columns], dim=-1)


def unpack_channels(packed: Tensor, count: int) -> tuple[Tensor, list[Tensor]]:
    """Split what :func:`pack_channels` appended: ``(hidden (B, T, C), [count tensors (B, T)])``."""
    if count == 0:
        return packed, []
    width = packed.shape[-1] - count
    return packed[..., :width], [packed[..., width + i].detach() for i in range(count)]


def resolve_attribute(module: nn.Module, dotted: str, *, argument: str) -> Any:
    """``module.a.b.c`` for ``dotted="a.b.c"`` (integers index ModuleLists), or a ValueError naming the argument.

    Args:
        module: where the path starts.
        dotted: the dotted path, e.g. ``"model.layers"`` or ``"encoder.layers.0"``.
        argument: the strategy argument that gave the path, for the message.
    """
    target: Any = module
    walked: list[str] = []
    for part in dotted.split("."):
        if part.isdigit() and isinstance(target, (nn.Sequential, nn.ModuleList)):
            index = int(part)
            if index >= len(target):
                raise ValueError(
                    f"{argument}={dotted!r}: {'.'.join(walked) or type(module).__name__} has {len(target)} entries, "
                    f"no index {index}."
                )
            target = target[index]
        elif hasattr(target, part):
            target = getattr(target, part)
        else:
            children = [n for n, _ in target.named_children()] if isinstance(target, nn.Module) else []
            raise ValueError(
                f"{argument}={dotted!r}: {'.'.join(walked) or type(module).__name__} has no attribute {part!r}"
                + (f" (its submodules: {', '.join(children)})." if children else ".")
            )
        walked.append(part)
    return target
