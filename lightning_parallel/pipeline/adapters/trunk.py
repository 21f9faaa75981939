"""SequentialTrunkAdapter: ``blocks="model.layers"`` names the trunk of a module that has no protocol hooks.

``ChimeraStrategy(blocks="encoder.layers", pre="embed", post=["norm", "head"], loss="cross_entropy")``:

- ``blocks``: the dotted name of an ``nn.Sequential`` or ``nn.ModuleList``; each entry is one block, called as
  ``block(x)`` with one tensor (an ``nn.TransformerEncoder``'s ``.layers`` without a mask, a CNN's stages).
- ``pre`` / ``post``: dotted names applied before / after the trunk, each one block of its own. A name that
  resolves to an ``nn.Module`` is that module; one that resolves to a method of the module is a step without
  parameters (e.g. ``def pool(self, h): return h.mean(1)``), called as ``method(x)``. Parameters used by none
  of the blocks are not trained by the pipeline (the strategy warns and names them).
- ``loss``: ``"cross_entropy"`` (default; logits flattened to ``(-1, C)`` against flattened targets),
  ``"nll"`` (the same for log-probabilities), ``"mse"``; or a dotted name on the module: an ``nn.Module``
  criterion is called as ``criterion(output, targets)``, a method as ``method(output, batch)``.
- The batch: ``(inputs, targets)`` (a tuple or list), a mapping with ``input_ids``/``inputs``/``input``/``x``
  and ``labels``/``targets``/``target``/``y``, or a lone tensor (then only a method loss works).

This module imports no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_parallel.pipeline.adapters.base import PipelineAdapter, SampleBatch, resolve_attribute

_INPUT_KEYS = ("input_ids", "inputs", "input", "x")
_TARGET_KEYS = ("labels", "targets", "target", "y")
_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cross_entropy": lambda out, y: F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)),
    "nll": lambda out, y: F.nll_loss(out.reshape(-1, out.shape[-1]), y.reshape(-1)),
    "mse": lambda out, y: F.mse_loss(out, y),
}


class MethodStep(nn.Module):
    """A block without parameters that calls one method of the module (held by reference, not registered)."""

    def __init__(self, method: Callable[[Tensor], Tensor], name: str) -> None:
        super().__init__()
        self.__dict__["_method"] = method  # not a submodule: the module's parameters stay out of this block
        self.step_name = name

    def forward(self, x: Tensor) -> Tensor:
        method: Callable[[Tensor], Tensor] = self.__dict__["_method"]
        return method(x)

    def __deepcopy__(self, memo: dict[int, Any]) -> MethodStep:
        # Chimera's second-pipeline copy of a stage: the same method (a deepcopy would copy the whole module).
        return MethodStep(self.__dict__["_method"], self.step_name)  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        return self.step_name


def batch_item(batch: Any, position: int, keys: Sequence[str], what: str) -> Any:
    """``batch[position]`` of a tuple/list batch, the first of ``keys`` of a mapping, or a ValueError."""
    if isinstance(batch, Mapping):
        for key in keys:
            if key in batch:
                return batch[key]
        raise ValueError(f"The batch has keys {sorted(batch)}; the {what} is looked for under {list(keys)}.")
    if isinstance(batch, (tuple, list)):
        return batch[position]
    if position == 0 and isinstance(batch, Tensor):
        return batch
    raise ValueError(f"The batch is a {type(batch).__name__}; the {what} needs an (inputs, targets) pair or a mapping.")


def build_loss(module: nn.Module, name: str) -> Callable[[Tensor, Any], Tensor]:
    """``loss(output, batch)`` for a built-in loss name or the dotted name of a criterion module / method.

    Args:
        module: the LightningModule the dotted name is resolved on.
        name: ``"cross_entropy"``, ``"nll"``, ``"mse"`` or a dotted name.
    """
    builtin = _LOSSES.get(name)
    if builtin is not None:
        return lambda out, batch: builtin(out, batch_item(batch, 1, _TARGET_KEYS, "target"))
    try:
        target = resolve_attribute(module, name, argument="loss")
    except ValueError as err:
        raise ValueError(f"{err} Built-in losses: {sorted(_LOSSES)}.") from err
    if isinstance(target, nn.Module):
        criterion = target
        return lambda out, batch: criterion(out, batch_item(batch, 1, _TARGET_KEYS, "target"))
    if callable(target):
        return target  # type: ignore[no-any-return]  # method(output, batch)
    raise ValueError(f"loss={name!r} is a {type(target).__name__}; name a built-in loss or a method.")


def _no_batch() -> Any:
    raise RuntimeError("SequentialTrunkAdapter needs no sample batch.")


class SequentialTrunkAdapter(PipelineAdapter):
    """The pipeline protocol of a module whose trunk is a named ``nn.Sequential``/``nn.ModuleList``.

    Args:
        blocks: dotted name of the trunk, e.g. ``"model.layers"``.
        pre: dotted name(s) applied before the trunk, in order (modules or methods). Default none.
        post: dotted name(s) applied after the trunk, in order (modules or methods). Default none.
        loss: ``"cross_entropy"`` (default), ``"nll"``, ``"mse"``, or the dotted name of a criterion module or
            of a ``method(output, batch)`` of the module.
    """

    name = "trunk"

    def __init__(
        self,
        blocks: str,
        *,
        pre: str | Sequence[str] | None = None,
        post: str | Sequence[str] | None = None,
        loss: str = "cross_entropy",
    ) -> None:
        self.trunk_name = blocks
        self.pre = [pre] if isinstance(pre, str) else list(pre or [])
        self.post = [post] if isinstance(post, str) else list(post or [])
        self.loss_name = loss
        self._blocks: list[nn.Module] = []
        self._fresh = False
        self._loss: Callable[[Tensor, Any], Tensor] | None = None

    def _step(self, module: nn.Module, dotted: str, argument: str) -> nn.Module:
        target = resolve_attribute(module, dotted, argument=argument)
        if isinstance(target, nn.Module):
            return target
        if callable(target):
            return MethodStep(target, dotted)
        raise ValueError(
            f"{argument}={dotted!r} is a {type(target).__name__}; name an nn.Module or a method of the module."
        )

    def prepare(self, module: nn.Module, *, sample_batch: SampleBatch) -> None:
        self._fresh = False  # resolved again at the first pipeline_blocks() call, see there
        trunk = resolve_attribute(module, self.trunk_name, argument="blocks")
        if not isinstance(trunk, (nn.Sequential, nn.ModuleList)):
            raise ValueError(
                f"blocks={self.trunk_name!r} is a {type(trunk).__name__}; it must name an nn.Sequential or "
                "nn.ModuleList whose entries run one after the other (e.g. 'encoder.layers' of nn.TransformerEncoder)."
            )
        if len(trunk) == 0:
            raise ValueError(f"blocks={self.trunk_name!r} is empty; name a trunk with at least one block.")
        self._blocks = (
            [self._step(module, name, "pre") for name in self.pre]
            + list(trunk)
            + [self._step(module, name, "post") for name in self.post]
        )
        self._loss = build_loss(module, self.loss_name)

    def pipeline_blocks(self, module: nn.Module) -> Sequence[nn.Module]:
        if not self._fresh:
            # The precision plugin converts the module after prepare (QAT swaps layers): name them again now.
            self.prepare(module, sample_batch=_no_batch)
            self._fresh = True
        return self._blocks

    def pipeline_input(self, module: nn.Module, batch: Any) -> Tensor:
        return batch_item(batch, 0, _INPUT_KEYS, "input")  # type: ignore[no-any-return]

    def pipeline_loss(self, module: nn.Module, output: Tensor, batch: Any) -> Tensor:
        if self._loss is None:
            raise RuntimeError("SequentialTrunkAdapter.prepare was not called.")
        return self._loss(output, batch)

    def describe(self) -> str:
        parts = [f"blocks={self.trunk_name!r}"]
        if self.pre:
            parts.append(f"pre={self.pre}")
        if self.post:
            parts.append(f"post={self.post}")
        return f"SequentialTrunkAdapter({', '.join(parts)}, loss={self.loss_name!r})"
