"""Adaptive per-layer error bounds from gradient statistics (COMET-style).

Design decisions:

- For a linear layer ``dW = delta^T x``. If the saved input ``x`` carries independent errors
  uniform in ``(-eb, eb)`` (variance ``eb^2 / 3``), the weight-gradient error has mean 0 and
  ``E||dW_err||_F^2 = eb^2 / 3 * fan_in * ||delta||_F^2``: every one of the ``fan_in`` columns
  of ``dW`` sums ``delta`` times independent errors. A convolution is the same with
  ``fan_in = in_channels / groups * prod(kernel)``. For a target relative error ``r`` of the
  weight gradient the layer's bound is therefore
  ``eb = r * ||dW||_F / (sqrt(fan_in / 3) * ||delta||_F)``.
- A saved tensor is identified by its *slot*: the order in which the forward first saves unique
  storages, which is the same every step for a static graph. During a calibration step (every
  ``adapt_interval`` steps, the first included) forward hooks note which weight layers save
  each slot (a ReLU output is first saved by the ReLU, then again as the next layer's input),
  and tensor hooks measure ``||delta||`` and ``||dW||``; after backward every slot gets the
  smallest bound of the layers that read it, capped at ``max_relative_bound`` of its value
  range (default 0.05): the formula only covers the weight gradient of the layer reading
  the tensor, while its error also travels backward through normalisation layers into every
  earlier layer, and with a 0.1 cap the whole-model gradient cosine of the digits ResNet
  collapsed within 20 steps although every layer's own target was met. Bounds are kept *relative to the value
  range* seen while calibrating and applied to the range of each new tensor: activations grow
  and shrink during training, and absolute bounds kept for ``adapt_interval`` steps measurably
  went stale (the gradient cosine of the digits ResNet fell from 0.99 to 0.6 within 40 steps).
- Slots no weight layer reads (norm inputs) keep the codec's own bound: the formula says nothing
  about them. So do the tensors attention saves (``scaled_dot_product_attention``'s query, key,
  value and output, found on calibration steps through a ``TorchFunctionMode``), even when a
  weight layer reads them too: the softmax exponentiates the logits computed from the query and
  key, and the attention backward reads its own output in the softmax gradient
  (``rowsum(dO * O)``), so their errors are not those of a linear layer's input. Measured on the
  GPT after 120 steps: the attention output alone at 5% of its range, a bound the formula allows
  for the output projection that reads it, lowered the whole-model gradient cosine to 0.985.
- Until the first calibration finished, and for slots beyond those seen (a dynamic graph), the
  codec's own bound applies. The state (step counter and bounds) is small and is saved in the
  checkpoint by the precision plugin.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Generator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

__all__ = ["AdaptiveErrorController", "layer_error_bound"]


def _finite_range(x: Tensor) -> float:
    """``max - min`` over the finite entries of ``x`` (0.0 when there are none)."""
    if x.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(x.detach().reshape(-1))
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        finite = x[torch.isfinite(x)]
        if finite.numel() == 0:
            return 0.0
        lo, hi = torch.aminmax(finite)
    return float(hi) - float(lo)


WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# functions whose saved tensors feed a softmax's backward (multi_head_attention_forward calls the first)
ATTENTION_FUNCTIONS = frozenset({F.scaled_dot_product_attention, F.multi_head_attention_forward})


class _AttentionWatch(TorchFunctionMode):
    """Counts how deep the running code is inside an attention function (``depth``)."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func not in ATTENTION_FUNCTIONS:
            return func(*args, **(kwargs or {}))
        self.depth += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.depth -= 1


def layer_error_bound(target: float, grad_weight_norm: float, grad_output_norm: float, fan_in: int) -> float:
    """The absolute bound that gives a weight-gradient error of relative size ``target``.

    Args:
        target: wanted ``||dW_err||_F / ||dW||_F``.
        grad_weight_norm: ``||dW||_F``.
        grad_output_norm: ``||delta||_F``, the gradient of the layer's output.
        fan_in: inputs per output unit (``in_features``; ``in_channels / groups * prod(kernel)``).
    """
    if grad_output_norm <= 0 or fan_in <= 0:
        return math.inf
    return target * grad_weight_norm / (math.sqrt(fan_in / 3.0) * grad_output_norm)


class AdaptiveErrorController:
    """Chooses the error bound of every saved tensor for a target relative weight-gradient error.

    Args:
        target_error: wanted relative error of each layer's weight gradient (> 0). Default 0.3.
        adapt_interval: steps between calibrations (>= 1). Default 100.
        max_relative_bound: cap of a bound as a fraction of the tensor's value range (> 0). Default 0.05.
    """

    def __init__(
        self, *, target_error: float = 0.3, adapt_interval: int = 100, max_relative_bound: float = 0.05
    ) -> None:
        for name, value in (("target_error", target_error), ("max_relative_bound", max_relative_bound)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"`{name}` must be a number, got {name}={value!r}.")
        if not target_error > 0:
            raise ValueError(f"`target_error` must be > 0, got target_error={target_error!r}.")
        if not isinstance(adapt_interval, int) or adapt_interval < 1:
            raise ValueError(
                f"`adapt_interval` must be an integer >= 1, got adapt_interval={adapt_interval!r}."
            )
        if not max_relative_bound > 0:
            raise ValueError(
                f"`max_relative_bound` must be > 0, got max_relative_bound={max_relative_bound!r}."
            )
        self.target_error = target_error
        self.adapt_interval = adapt_interval
        self.max_relative_bound = max_relative_bound
        self.step = 0
        self.bounds: dict[int, float] = {}  # slot -> bound as a fraction of the value range
        self.layer_bounds: dict[str, float] = {}
        self._recording = False
        self._stack: list[str] = []
        self._consumers: dict[int, set[str]] = {}
        self._attention_slots: set[int] = set()
        self._watch: _AttentionWatch | None = None  # set during a calibrating forward
        self._ranges: dict[int, float] = {}
        self._delta_sq: dict[str, float] = {}
        self._grad_w_sq: dict[str, float] = {}
        self._fan_in: dict[str, int] = {}
        self._weight_hooked: set[str] = set()
        self._handles: list[RemovableHandle] = []
        self._step_handles: list[RemovableHandle] = []

    @property
    def recording(self) -> bool:
        """Whether the current step calibrates."""
        return self._recording

    def attach(self, model: nn.Module) -> None:
        """Hooks the weight layers of ``model`` (Linear and Conv); replaces earlier hooks.

        Args:
            model: the model whose activations are compressed.
        """
        self.detach()
        for name, module in model.named_modules():
            if isinstance(module, WEIGHT_LAYERS):
                weight: Tensor = module.weight  # type: ignore[assignment]
                self._fan_in[name] = weight[0].numel()
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
                self._handles.append(module.register_forward_hook(self._post_hook(name, module)))

    def detach(self) -> None:
        """Removes every hook."""
        for h in (*self._handles, *self._step_handles):
            h.remove()
        self._handles.clear()
        self._step_handles.clear()
        self._fan_in.clear()

    def begin_step(self) -> None:
        """Called before the training forward: decides whether this step calibrates."""
        self._recording = self.step % self.adapt_interval == 0 and bool(self._fan_in)
        self._stack.clear()
        self._consumers.clear()
        self._attention_slots.clear()
        self._ranges.clear()
        self._delta_sq.clear()
        self._grad_w_sq.clear()
        self._weight_hooked.clear()

    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        """Wraps the training forward: on calibration steps, notes the tensors attention saves."""
        if not self._recording:
            yield
            return
        self._watch = _AttentionWatch()
        try:
            with self._watch:
                yield
        finally:
            self._watch = None

    def _pre_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            if self._recording and torch.is_grad_enabled():
                self._stack.append(name)

        return hook

    def _post_hook(self, name: str, module: nn.Module) -> Any:
        def hook(module_: nn.Module, args: Any, output: Any) -> None:
            if not (self._recording and torch.is_grad_enabled()):
                return
            if self._stack and self._stack[-1] == name:
                self._stack.pop()
            if isinstance(output, Tensor) and output.requires_grad:
                self._step_handles.append(output.register_hook(self._delta_hook(name)))
            weight: Tensor = module.weight  # type: ignore[assignment]
            if weight.requires_grad and name not in self._weight_hooked:
                # one hook per weight: it sees the sum over every use of the layer
                self._weight_hooked.add(name)
                self._step_handles.append(weight.register_hook(self._weight_hook(name)))

        return hook

    def _delta_hook(self, name: str) -> Any:
        def hook(grad: Tensor) -> None:
            self._delta_sq[name] = self._delta_sq.get(name, 0.0) + float(grad.detach().float().pow(2).sum())

        return hook

    def _weight_hook(self, name: str) -> Any:
        def hook(grad: Tensor) -> None:
            self._grad_w_sq[name] = self._grad_w_sq.get(name, 0.0) + float(grad.detach().float().pow(2).sum())

        return hook

    def observe(self, slot: int) -> None:
        """Notes that the layer running now (if any) reads the ``slot``-th saved storage.

        Args:
            slot: index of the storage in save order.
        """
        if not self._recording:
            return
        if self._watch is not None and self._watch.depth:
            self._attention_slots.add(slot)
        elif self._stack:
            self._consumers.setdefault(slot, set()).add(self._stack[-1])

    def bound(self, slot: int, x: Tensor) -> float | None:
        """The absolute bound for the ``slot``-th saved storage, or ``None`` for the codec's own.

        Args:
            slot: index of the storage in save order.
            x: the tensor; the bound is its value range times the slot's relative bound.
        """
        relative = self.bounds.get(slot)
        if not self._recording and relative is None:
            return None
        value_range = _finite_range(x)
        if self._recording:
            self._ranges[slot] = value_range
        return None if relative is None else relative * value_range

    def end_step(self) -> None:
        """Called after backward: on a calibration step, recomputes the bounds; advances the step."""
        if self._recording:
            self._recording = False
            for h in self._step_handles:
                h.remove()
            self._step_handles.clear()
            self.layer_bounds = {
                name: layer_error_bound(
                    self.target_error,
                    math.sqrt(self._grad_w_sq[name]),
                    math.sqrt(self._delta_sq[name]),
                    self._fan_in[name],
                )
                for name in self._delta_sq
                if name in self._grad_w_sq
            }
            bounds: dict[int, float] = {}
            for slot, names in self._consumers.items():
                if slot in self._attention_slots:
                    continue
                eb = min((self.layer_bounds.get(n, math.inf) for n in names), default=math.inf)
                cap = self.max_relative_bound * self._ranges.get(slot, 0.0)
                eb = min(eb, cap)
                if 0 < eb < math.inf:
                    bounds[slot] = eb / self._ranges[slot]
            self.bounds = bounds
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        """Step counter and bounds, for checkpoints."""
        return {"step": self.step, "bounds": dict(self.bounds), "layer_bounds": dict(self.layer_bounds)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`.

        Args:
            state: a dict returned by :meth:`state_dict`.
        """
        self.step = int(state["step"])
        self.bounds = {int(k): float(v) for k, v in state["bounds"].items()}
        self.layer_bounds = {str(k): float(v) for k, v in state.get("layer_bounds", {}).items()}
