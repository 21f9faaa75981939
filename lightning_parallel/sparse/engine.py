"""``SparseEngine``: masks or sparse patterns of a model's layers, their updates and their state (no Lightning).

Covered layers: ``nn.Linear`` (and subclasses), ``nn.Conv2d``, and the weights of every other linear-like type
of the layer registry (:mod:`lightning_parallel.layers`: Hugging Face ``Conv1D``, ``nn.MultiheadAttention``'s
packed input projection), masked as whole weight tensors. Other modules holding weights of two or more
dimensions (embeddings, ...) stay dense; the engine reports them by type with counts (``uncovered``) so the
caller can warn once.

Execution:

- ``"masked"``: dense weights; the mask zeroes the gradient before each optimizer step (so SGD with momentum
  or weight decay and Adam(W) leave inactive weights and their state at zero) and the weight after it; at a
  mask update, the dropped and the newly grown positions get weight 0 and optimizer state 0.
- ``"sparse"``: every plain ``nn.Linear`` becomes a :class:`SparseLinear` (only the nonzeros are parameters);
  other covered layers (Conv2d, Linear subclasses used by fused modules) stay masked.

Mask updates happen before the optimizer step of the update step (the new weights get their first gradient
in that step), at steps ``t`` with ``t % update_interval == 0`` and ``0 < t < stop_at``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_parallel.sparse.densities import erk_densities, uniform_densities
from lightning_parallel.sparse.neurons import linear_pairs, neuron_importance, neurons_to_keep, shrink_pair
from lightning_parallel.sparse.sparse_linear import SparseLinear
from lightning_parallel.sparse.sparse_updates import (
    Reduce,
    dense_grad_top,
    kept_entries,
    random_positions,
    regrow,
)
from lightning_parallel.sparse.updates import drop_fraction_at, random_mask, rigl_update, set_update

METHODS = ("rigl", "set", "static")
DISTRIBUTIONS = ("uniform", "erk")
EXECUTIONS = ("masked", "sparse")
DECAYS = ("cosine", "constant")


def _choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}={value!r}` is not one of {list(allowed)}.")


def check_options(
    *, method: str, sparsity: float, distribution: str, drop_fraction: float, decay: str, execution: str
) -> None:
    """Raise ``ValueError`` naming the first bad option, its value and what works."""
    _choice("method", method, METHODS)
    _choice("distribution", distribution, DISTRIBUTIONS)
    _choice("execution", execution, EXECUTIONS)
    _choice("decay", decay, DECAYS)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"`sparsity={sparsity}` must be in [0, 1): the fraction of zero weights, e.g. 0.9.")
    if not 0.0 <= drop_fraction <= 1.0:
        raise ValueError(f"`drop_fraction={drop_fraction}` must be in [0, 1], e.g. 0.3.")


def covered_layers(
    model: nn.Module, skip_layers: Sequence[str] = ()
) -> tuple[dict[str, nn.Module | torch.Tensor], Counter[str]]:
    """The layers sparse training covers, and a count by type of the weighted modules it leaves dense.

    ``nn.Linear`` (and subclasses), ``nn.Conv2d`` and ``SparseLinear`` are keyed by module name; the weights of
    the other linear-like types of the project's layer registry (:mod:`lightning_parallel.layers`: Hugging Face
    ``Conv1D``, ``nn.MultiheadAttention``'s packed input projection) by parameter name, as the tensor itself
    (masked execution only). A weight tied to a module that is not covered (an embedding) is left dense.
    """
    import re

    from lightning_parallel.layers.registry import find_targets

    def skipped(name: str, module: nn.Module) -> bool:
        return any(re.search(p, name) or re.search(p, type(module).__name__) for p in skip_layers)

    layers: dict[str, nn.Module | torch.Tensor] = {}
    claimed: set[int] = set()
    for name, module in model.named_modules():
        if not skipped(name, module) and isinstance(module, (nn.Linear, nn.Conv2d, SparseLinear)):
            layers[name] = module
            claimed.add(id(module.values if isinstance(module, SparseLinear) else module.weight))
    # a weight tied to a module left dense (GPT-2's lm_head and its token embedding) stays dense too
    module_weights = {id(m.weight): name for name, m in layers.items() if isinstance(m, (nn.Linear, nn.Conv2d))}
    covered_modules = {id(m) for m in layers.values()}
    tied: set[int] = set()
    for module in model.modules():
        if id(module) in covered_modules:
            continue
        for param in module.parameters(recurse=False):
            if id(param) in module_weights:
                layers.pop(module_weights.pop(id(param)), None)
                tied.add(id(param))
    claimed -= tied
    parameter_names = {id(p): n for n, p in model.named_parameters()}
    for target in find_targets(model, skip=skipped):
        weight = target.weight
        if id(weight) not in claimed | tied and id(weight) in parameter_names:
            claimed.add(id(weight))
            layers[parameter_names[id(weight)]] = weight
    uncovered: Counter[str] = Counter()
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.dim() >= 2]
        if own and not any(id(p) in claimed for p in own):
            uncovered[type(module).__name__] += 1
    return layers, uncovered


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class SparseEngine:
    """Keeps a model's covered layers at a fixed number of nonzeros and updates which ones (SET, RigL).

    Args:
        model: the model; with ``execution="sparse"`` its ``nn.Linear`` layers are replaced in place.
        method: ``"rigl"``, ``"set"`` or ``"static"``.
        sparsity: global fraction of zero weights over the covered layers, in [0, 1).
        distribution: ``"uniform"`` or ``"erk"`` per-layer densities.
        drop_fraction: fraction of active weights replaced at the first update.
        decay: ``"cosine"`` or ``"constant"`` schedule of the drop fraction.
        execution: ``"masked"`` or ``"sparse"``.
        seed: seed of the initial masks and SET's regrowth (the same on every replica).
        skip_layers: regular expressions on qualified or class names of layers left dense.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        method: str = "rigl",
        sparsity: float = 0.9,
        distribution: str = "erk",
        drop_fraction: float = 0.3,
        decay: str = "cosine",
        execution: str = "masked",
        seed: int = 0,
        skip_layers: Sequence[str] = (),
    ) -> None:
        check_options(
            method=method, sparsity=sparsity, distribution=distribution, drop_fraction=drop_fraction,
            decay=decay, execution=execution,
        )
        self.method, self.sparsity, self.drop_fraction, self.decay = method, sparsity, drop_fraction, decay
        self.execution = execution
        self.model = model
        self.generator = torch.Generator().manual_seed(seed)
        layers, self.uncovered = covered_layers(model, skip_layers)
        if not layers:
            raise ValueError(
                f"The model {type(model).__name__} has no nn.Linear or nn.Conv2d layer for sparse training "
                f"(skip_layers={list(skip_layers)})."
            )
        shapes = {name: tuple(_weight_shape(m)) for name, m in layers.items()}
        make = erk_densities if distribution == "erk" else uniform_densities
        self.densities = make(shapes, 1.0 - sparsity)
        self.masks: dict[str, torch.Tensor] = {}
        self.sparse: dict[str, SparseLinear] = {}
        self.weights: dict[str, torch.Tensor] = {}  # the masked layers' weights
        self.elsewhere: dict[str, int] = {}  # masked layers another pipeline rank trains -> their numel
        self.sparse_elsewhere: set[str] = set()  # sparse layers another pipeline rank trains
        for name, module in layers.items():
            if isinstance(module, SparseLinear):
                self.sparse[name] = module
                continue
            if self.densities[name] >= 1.0:
                continue
            weight = _weight(module)
            mask = random_mask(weight.shape, self.densities[name], self.generator).to(weight.device)
            if execution == "sparse" and type(module) is nn.Linear:
                sparse = SparseLinear.from_linear(module, mask)
                _replace(model, name, sparse)
                self.sparse[name] = sparse
            else:
                self.masks[name] = mask
                self.weights[name] = weight
        if execution == "sparse" and not self.sparse:
            raise ValueError(
                "`execution='sparse'` runs plain nn.Linear layers only and the model has none left sparse "
                f"(covered: {sorted({type(m).__name__ for m in layers.values()})}); use execution='masked'."
            )
        self._order = list(self.masks)  # every masked layer, in the order SET draws its random numbers
        self.apply_masks()

    def keep_only(self, held: Mapping[str, nn.Module | torch.Tensor]) -> list[str]:
        """Keep the layers named in ``held``, rebound to the given module or weight; drop the others.

        Under a pipeline strategy a rank trains only some stages, and a stage may be a copy of the module's
        blocks (Chimera's second pipeline): ``held`` maps the engine's layer names to the layers this rank
        trains. The dropped layers' masks and patterns are freed; SET still draws the random numbers of dropped
        masked layers at every update (``elsewhere``), so the held layers' decisions equal those of one engine
        over the whole model.

        Args:
            held: engine layer name -> the module (or registry weight tensor) this rank trains under that name.

        Returns:
            The names of the layers dropped.

        Raises:
            ValueError: for SET with sparse layers to drop (its draws for a sparse layer depend on the layer's
                pattern, which only the ranks holding it know).
        """
        dropped_sparse = [name for name in self.sparse if name not in held]
        if dropped_sparse and self.method == "set":
            raise ValueError(
                f"SET in sparse execution cannot split its random stream by stage ({len(dropped_sparse)} sparse "
                "layer(s) live on other ranks): use method='rigl' or 'static', or execution='masked'."
            )
        dropped = [name for name in self.masks if name not in held]
        for name in dropped:
            self.elsewhere[name] = self.masks.pop(name).numel()
            del self.weights[name]
        for name in self.masks:
            self.weights[name] = _weight(held[name])
        for name in dropped_sparse:
            del self.sparse[name]
            self.sparse_elsewhere.add(name)
        for name in self.sparse:
            layer = held[name]
            if not isinstance(layer, SparseLinear):
                raise TypeError(f"{name} is sparse in the engine but the held layer is {type(layer).__name__}.")
            self.sparse[name] = layer
        self.apply_masks()
        return dropped + dropped_sparse

    @property
    def masked_by_sparse_fallback(self) -> int:
        """Covered layers that stay masked although ``execution="sparse"`` (Conv2d, Linear subclasses)."""
        return len(self.masks) if self.execution == "sparse" else 0

    # ---- every step --------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the inactive weights of the masked layers."""
        for name, mask in self.masks.items():
            self.weights[name].mul_(mask)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradient at inactive positions of the masked layers (call before ``optimizer.step``)."""
        for name, mask in self.masks.items():
            grad = self.weights[name].grad
            if grad is not None:
                grad.mul_(mask)

    # ---- updates -----------------------------------------------------------------------------------------
    def is_update_step(self, step: int, *, update_interval: int, stop_at: int) -> bool:
        """Whether masks change before optimizer step ``step`` (0-based count of steps already taken)."""
        return self.method != "static" and 0 < step < stop_at and step % update_interval == 0

    def record_dense_gradients(self, on: bool) -> None:
        """Make the sparse layers keep ``(x, dy)`` in the next backward (RigL's growth needs them)."""
        for layer in self.sparse.values():
            layer.record = on and self.method == "rigl"
            if not on:
                layer.recorded = None

    @torch.no_grad()
    def update(
        self, step: int, *, stop_at: int, optimizer: torch.optim.Optimizer | None = None,
        reduce: Reduce | Mapping[str, Reduce] | None = None,
    ) -> float:
        """Drop and grow in every layer; returns the drop fraction used.

        Args:
            step: optimizer steps taken so far (sets the drop fraction).
            stop_at: the step of the last update (the cosine reaches 0 there).
            optimizer: its per-weight state is zeroed or moved with the weights.
            reduce: all-reduce mean over replicas of RigL's dense gradient blocks of sparse layers (masked layers
                read ``weight.grad``, already averaged by data parallelism); a mapping gives one per sparse layer
                (under a pipeline, the holders of each layer's stage).
        """
        fraction = drop_fraction_at(step, initial=self.drop_fraction, stop_at=stop_at, decay=self.decay)
        for name in self._order:
            if name not in self.masks:  # trained by another pipeline rank: keep SET's random stream in step
                if self.method == "set" and name in self.elsewhere:
                    torch.rand(self.elsewhere[name], generator=self.generator)
                continue
            weight, mask = self.weights[name], self.masks[name]
            if self.method == "rigl":
                if weight.grad is None:
                    raise RuntimeError(f"RigL needs the gradient of {name}.weight at the update step.")
                new = rigl_update(weight, mask, weight.grad, fraction)
            else:
                new = set_update(weight, mask, fraction, self.generator)
            keep = new & mask  # kept or grown back where it was: value and state stay
            weight.mul_(keep)
            for state in _param_states(optimizer, weight):
                state.mul_(keep)
            self.masks[name] = new
        for name, layer in self.sparse.items():
            kept = kept_entries(layer.values, fraction, self.method)
            count = layer.values.numel() - kept.numel()
            exclude = layer.indices[kept]
            numel = math.prod(layer.weight_shape)
            if self.method == "rigl":
                layer_reduce = reduce.get(name) if isinstance(reduce, Mapping) else reduce
                grown = dense_grad_top(layer, exclude, count, reduce=layer_reduce)
            else:
                grown = random_positions(numel, exclude, count, self.generator)
            regrow(layer, kept, grown, _param_states(optimizer, layer.values))
            layer.record, layer.recorded = False, None
        return fraction

    @torch.no_grad()
    def prune_neurons(self, fraction: float, *, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
        """Remove the ``fraction`` least important hidden neurons of every linear pair; returns removed counts.

        Weights, biases, masks, sparse patterns and per-weight optimizer state shrink in place
        (:mod:`lightning_parallel.sparse.neurons`); the number of nonzeros falls with them.
        """
        removed: dict[str, int] = {}
        for first, second in linear_pairs(self.model):
            layer, following = self.model.get_submodule(first), self.model.get_submodule(second)
            keep = neurons_to_keep(neuron_importance(layer, following), fraction)  # type: ignore[arg-type]
            removed[first] = int(layer.out_features) - keep.numel()  # type: ignore[arg-type]
            if removed[first] == 0:
                continue
            if first in self.masks:
                self.masks[first] = self.masks[first].index_select(0, keep)
            if second in self.masks:
                self.masks[second] = self.masks[second].index_select(1, keep)
            shrink_pair(layer, following, keep, lambda p: _param_states(optimizer, p))  # type: ignore[arg-type]
        return removed

    # ---- inspection and state ----------------------------------------------------------------------------
    def nnz(self) -> dict[str, int]:
        """Active weights per layer."""
        counts = {name: int(mask.sum()) for name, mask in self.masks.items()}
        counts.update({name: layer.values.numel() for name, layer in self.sparse.items()})
        return counts

    def state_dict(self) -> dict[str, Any]:
        """Masks (as bool tensors), sparse patterns (indices and values) and the generator state."""
        return {
            "masks": {name: mask.cpu().clone() for name, mask in self.masks.items()},
            "patterns": {
                name: {"indices": layer.indices.cpu().clone(), "values": layer.values.detach().cpu().clone()}
                for name, layer in self.sparse.items()
            },
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore masks, patterns and the generator (the model must have been built by this engine's config)."""
        unknown = (set(state["masks"]) - set(self.masks) - set(self.elsewhere)) | (
            set(state["patterns"]) - set(self.sparse) - self.sparse_elsewhere
        )
        if unknown:
            raise ValueError(
                f"The checkpoint's sparse layers {sorted(unknown)} are not sparse here (masked: {sorted(self.masks)}, "
                f"sparse: {sorted(self.sparse)}): resume with the same method, distribution and execution."
            )
        for name, mask in state["masks"].items():
            if name in self.masks:  # a layer another pipeline rank trains keeps its mask there
                self.masks[name] = mask.to(self.masks[name].device)
        for name, pattern in state["patterns"].items():
            if name not in self.sparse:  # a layer another pipeline rank trains keeps its pattern there
                continue
            layer = self.sparse[name]
            layer.load_pattern(pattern["indices"].to(layer.indices.device), pattern["values"].to(layer.values))
        self.generator.set_state(state["generator"])
        self.apply_masks()


def _weight(module: nn.Module | torch.Tensor) -> torch.Tensor:
    if isinstance(module, torch.Tensor):
        return module
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.weight is not a tensor.")
    return weight


def _weight_shape(module: nn.Module | torch.Tensor) -> torch.Size:
    if isinstance(module, SparseLinear):
        return torch.Size(module.weight_shape)
    return _weight(module).shape


def _param_states(optimizer: torch.optim.Optimizer | None, param: torch.Tensor) -> list[torch.Tensor]:
    """The optimizer's per-element state tensors of ``param`` (momentum, exp_avg, exp_avg_sq, ...)."""
    if optimizer is None or param not in optimizer.state:
        return []
    return [
        value for value in optimizer.state[param].values()
        if isinstance(value, torch.Tensor) and value.shape == param.shape
    ]
