"""TracedAdapter: pipeline any module ``torch.export`` can trace, cut at named submodules.

``ChimeraStrategy(split_points=["encoder.layers.2"], loss="cross_entropy")`` (or ``adapter="traced"``,
``adapter="traced:model"``, ``adapter=TracedAdapter(...)``) traces the module's ``forward`` on one micro-batch
of the run with ``torch.distributed.pipelining.pipeline`` and runs the stages of the split graph on this
package's schedules (:mod:`lightning_parallel.pipeline.traced` holds the splitting; this file is the protocol).

- ``module``: the dotted name of the module whose ``forward`` is traced; split points are named relative to
  it. Default: the LightningModule's only child that holds all its trainable parameters (``self.model``), else
  the LightningModule itself.
- ``split_points``: dotted names of submodules that start a new stage (``stages - 1`` of them), or ``"auto"``
  (default): an even split of the longest ``nn.ModuleList``/``nn.Sequential``
  (:func:`~lightning_parallel.pipeline.traced.auto_split_points`).
- ``inputs``: which parts of the batch are the positional arguments of ``forward``: positions of a tuple
  batch or keys of a mapping. Default: the first item (``batch[0]``, or ``input_ids``/``inputs``/``input``/``x``).
- ``forward_kwargs``: constant keyword arguments of every call, e.g. ``{"use_cache": False}`` for a Hugging Face
  model (whose cache object ``torch.export`` cannot return). They are fixed in the trace.
- ``loss``: as for the sequential trunk: ``"cross_entropy"`` (default), ``"nll"``, ``"mse"`` against the batch's
  targets, or the dotted name of a criterion module or of a ``method(output, batch)`` of the LightningModule.
  A built-in loss of a mapping output (a Hugging Face ``ModelOutput``) uses its ``logits``.
- The trace happens when the strategy first asks for the blocks (after the module is on its device and the
  precision plugin converted it), on the first micro-batch of ``sample_batch()``; the micro-batch count and
  the number of stages are read off the module's Trainer strategy (``num_micro_batches`` or
  ``micro_batches``, ``num_stages``). The trace is specialised on that micro-batch's shapes.
- One block per stage: ``stages`` must equal ``len(split_points) + 1``.
- Interlocking backprop: a stage's auxiliary head unpacks the stage's packed output, takes its largest
  floating value (the hidden state) and applies the default head of
  :func:`~lightning_parallel.interlocking.heads.default_aux_head` to it.

This module imports no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_parallel.pipeline.adapters.base import PipelineAdapter, SampleBatch, resolve_attribute
from lightning_parallel.pipeline.adapters.trunk import _INPUT_KEYS, _LOSSES, batch_item, build_loss
from lightning_parallel.pipeline.micro_batches import split_micro_batches
from lightning_parallel.pipeline.traced import TracedSplit, auto_split_points, split_traced, unpack


def _strategy_shape(module: nn.Module) -> tuple[int | None, int]:
    """(stages, micro-batches) of the Trainer strategy driving ``module`` (duck-typed: no Lightning import).

    Raises:
        ValueError: under ``stage_local=True`` (the trace needs the whole module on every rank).
    """
    strategy = getattr(getattr(module, "_trainer", None), "strategy", None)
    if getattr(strategy, "stage_local", False):
        raise ValueError(
            "stage_local=True cannot be combined with a traced split (split_points= / adapter='traced'): the trace "
            "needs the whole module on every rank. Use stage_local=False, or blocks= / adapter='hf'."
        )
    stages = getattr(strategy, "num_stages", None)
    micro = getattr(strategy, "num_micro_batches", None) or getattr(strategy, "micro_batches", None) or 1
    return (int(stages) if stages is not None else None), int(micro)


def _batch_to(batch: Any, device: Any) -> Any:
    from torch.utils import _pytree as pytree

    return pytree.tree_map(lambda v: v.to(device) if isinstance(v, Tensor) else v, batch)


class _UnpackedHead(nn.Module):
    """An auxiliary head on one value of a packed stage output."""

    def __init__(self, position: int, head: nn.Module) -> None:
        super().__init__()
        self.position = position
        self.head = head

    def forward(self, packed: Tensor) -> Tensor:
        return self.head(unpack(packed)[self.position])  # type: ignore[no-any-return]


class TracedAdapter(PipelineAdapter):
    """The pipeline protocol of a module split by tracing (``torch.distributed.pipelining.pipeline``).

    Args:
        module: dotted name of the traced module, relative to the LightningModule; ``None`` (default) picks the
            only child holding all trainable parameters, else the LightningModule itself.
        split_points: dotted names (relative to the traced module) of the submodules that start stages 1, 2,
            ...; ``"auto"`` (default) splits the longest ModuleList/Sequential evenly.
        inputs: positions (tuple batch) or keys (mapping batch) of ``forward``'s positional arguments; ``None``
            (default) is the first item.
        forward_kwargs: constant keyword arguments of every ``forward`` call (fixed in the trace). Default none.
        loss: ``"cross_entropy"`` (default), ``"nll"``, ``"mse"``, or the dotted name of a criterion module or a
            ``method(output, batch)`` of the LightningModule.
    """

    name = "traced"

    def __init__(
        self,
        module: str | None = None,
        *,
        split_points: str | Sequence[str] = "auto",
        inputs: Sequence[int | str] | None = None,
        forward_kwargs: dict[str, Any] | None = None,
        loss: str = "cross_entropy",
    ) -> None:
        if isinstance(split_points, str) and split_points != "auto":
            raise ValueError(
                f"split_points={split_points!r} must be 'auto' or a list of submodule names, e.g. ['layers.2']."
            )
        if not isinstance(split_points, str) and not all(isinstance(n, str) and n for n in split_points):
            raise TypeError(f"split_points={split_points!r} must list dotted submodule names, e.g. ['layers.2'].")
        self.module_name = module
        self.split_points: str | list[str] = split_points if isinstance(split_points, str) else list(split_points)
        self.inputs = None if inputs is None else list(inputs)
        self.forward_kwargs = dict(forward_kwargs or {})
        self.loss_name = loss
        self._sample: SampleBatch | None = None
        self._split: TracedSplit | None = None
        self._traced: nn.Module | None = None
        self._loss: Callable[[Tensor, Any], Tensor] | None = None

    def _target(self, module: nn.Module) -> nn.Module:
        if self.module_name is not None:
            target = resolve_attribute(module, self.module_name, argument="module")
            if not isinstance(target, nn.Module):
                raise ValueError(f"module={self.module_name!r} is a {type(target).__name__}; name an nn.Module.")
            return target
        trainable = {id(p) for p in module.parameters() if p.requires_grad}
        for _, child in module.named_children():
            if trainable and {id(p) for p in child.parameters() if p.requires_grad} == trainable:
                return child
        return module

    @staticmethod
    def _forward_args(self_inputs: list[int | str] | None, batch: Any) -> tuple[Any, ...]:
        if self_inputs is None:
            return (batch_item(batch, 0, _INPUT_KEYS, "input"),)
        return tuple(batch[key] for key in self_inputs)

    def prepare(self, module: nn.Module, *, sample_batch: SampleBatch) -> None:
        self._traced = self._target(module)
        self._sample = sample_batch
        self._loss = build_loss(module, self.loss_name)
        self._split = None

    def _build(self, module: nn.Module) -> TracedSplit:
        if self._traced is None or self._sample is None:
            raise RuntimeError("TracedAdapter.prepare was not called.")
        traced = self._traced
        stages, micro = _strategy_shape(module)
        if self.split_points == "auto":
            if stages is None:
                raise ValueError("split_points='auto' needs the number of stages; give split_points explicitly.")
            points = auto_split_points(traced, stages)
        else:
            points = list(self.split_points)
            if stages is not None and len(points) + 1 != stages:
                raise ValueError(
                    f"split_points={points} cut {type(traced).__name__} into {len(points) + 1} stages but the strategy "
                    f"has stages={stages}; give stages - 1 = {stages - 1} split points, or split_points='auto'."
                )
        device = next((p.device for p in traced.parameters()), None)
        sample = split_micro_batches(self._sample(), micro)[0]
        if device is not None:
            sample = _batch_to(sample, device)
        args = self._forward_args(self.inputs, sample)
        return split_traced(traced, args, self.forward_kwargs, split_points=points)

    def pipeline_blocks(self, module: nn.Module) -> Sequence[nn.Module]:
        if self._split is None:
            self._split = self._build(module)
        return self._split.stages

    def pipeline_input(self, module: nn.Module, batch: Any) -> Tensor:
        if self._split is None or self._traced is None:
            raise RuntimeError("TracedAdapter: pipeline_blocks() must run before pipeline_input().")
        args = self._forward_args(self.inputs, batch)
        return self._split.stage_input(args, self.forward_kwargs, forward=self._traced.forward)

    def pipeline_loss(self, module: nn.Module, output: Tensor, batch: Any) -> Tensor:
        if self._loss is None:
            raise RuntimeError("TracedAdapter.prepare was not called.")
        if isinstance(output, Mapping) and self.loss_name in _LOSSES:
            output = output["logits"] if "logits" in output else next(iter(output.values()))
        return self._loss(output, batch)

    def pipeline_aux_head(self, module: nn.Module, stage_index: int, sample_output: Tensor) -> nn.Module | None:
        from lightning_parallel.interlocking.heads import default_aux_head

        if self._split is None or self._split.sample_output is None:
            raise RuntimeError("TracedAdapter: pipeline_blocks() must run before pipeline_aux_head().")
        values = unpack(sample_output)
        tensors = [i for i, v in enumerate(values) if isinstance(v, Tensor)]  # (sizes travel as ints too)
        position = max(tensors, key=lambda i: (values[i].is_floating_point(), values[i].numel()))
        return _UnpackedHead(position, default_aux_head(stage_index, values[position], self._split.sample_output))

    def describe(self) -> str:
        return f"TracedAdapter(module={self.module_name!r}, split_points={self.split_points!r}, loss={self.loss_name!r})"
