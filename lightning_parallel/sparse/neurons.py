"""Neuron importance pruning: remove whole hidden neurons and shrink the layers physically.

A hidden neuron ``j`` of a pair (``layer``, ``next``) of linear layers is output row ``j`` of ``layer`` and input
column ``j`` of ``next``. Its importance is the sum of the absolute values of its incoming and outgoing weights,
``sum_i |W_layer[j, i]| + sum_k |W_next[k, j]|`` (zeros of a sparse layer count as nothing). Pruning removes the
``fraction`` of neurons of lowest importance (ties by index) from both layers: the weights, bias, masks,
sparse patterns and per-weight optimizer state are cut in place, keeping every ``nn.Parameter`` object, so
the optimizer keeps working without being rebuilt.

Only chains of linear layers are pruned (:func:`linear_pairs` states the rule); the last layer's outputs are
never pruned.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lightning_parallel.sparse.sparse_linear import SparseLinear

Linearish = nn.Linear | SparseLinear


ELEMENTWISE = (
    nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.Softplus, nn.Hardtanh,
    nn.Dropout, nn.Identity,
)


def _in_sequentials(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    parents = [".".join(parts[:i]) for i in range(1, len(parts))]
    return bool(parents) and all(isinstance(model.get_submodule(p), nn.Sequential) for p in parents)


def linear_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(layer, next)`` names of linear layers whose hidden neurons can be pruned.

    The rule: the leaf modules in definition order; ``layer`` and ``next`` are ``nn.Linear``/``SparseLinear``
    leaves with only parameter-free element-wise modules (activations, dropout) between them, both nested in
    ``nn.Sequential`` containers only (so definition order is data flow), and ``layer.out_features ==
    next.in_features``.
    """
    pairs: list[tuple[str, str]] = []
    previous: tuple[str, nn.Module] | None = None
    for name, module in model.named_modules():
        if next(module.children(), None) is not None or not name:
            continue  # containers
        if type(module) in (nn.Linear, SparseLinear) and _in_sequentials(model, name):
            if previous is not None and previous[1].out_features == module.in_features:
                pairs.append((previous[0], name))
            previous = (name, module)
        elif not isinstance(module, ELEMENTWISE):
            previous = None
    return pairs


def _dense_abs(layer: Linearish) -> torch.Tensor:
    if isinstance(layer, SparseLinear):
        return layer.dense_weight().abs()
    return layer.weight.detach().abs()


def neuron_importance(layer: Linearish, following: Linearish) -> torch.Tensor:
    """``(layer.out_features,)``: summed absolute incoming plus outgoing weights of each hidden neuron."""
    if isinstance(layer, SparseLinear):
        rows = torch.div(layer.indices, layer.in_features, rounding_mode="floor")
        incoming = torch.zeros(layer.out_features, dtype=layer.values.dtype, device=layer.values.device)
        incoming.index_add_(0, rows, layer.values.detach().abs())
    else:
        incoming = layer.weight.detach().abs().sum(1)
    if isinstance(following, SparseLinear):
        cols = following.indices % following.in_features
        outgoing = torch.zeros(following.in_features, dtype=following.values.dtype, device=following.values.device)
        outgoing.index_add_(0, cols, following.values.detach().abs())
    else:
        outgoing = following.weight.detach().abs().sum(0)
    return incoming + outgoing


def neurons_to_keep(importance: torch.Tensor, fraction: float, *, min_neurons: int = 1) -> torch.Tensor:
    """Sorted indices of the neurons kept when the ``fraction`` least important are removed."""
    n = importance.numel()
    keep = max(min_neurons, n - round(fraction * n))
    return torch.sort(torch.topk(importance, min(n, keep), sorted=False).indices).values


StateOf = Callable[[torch.Tensor], list[torch.Tensor]]


def _cut(param: torch.Tensor, index: torch.Tensor, dim: int, states: StateOf) -> None:
    for state in states(param):
        state.data = state.data.index_select(dim, index)
    param.data = param.data.index_select(dim, index)


def _cut_sparse(layer: SparseLinear, keep: torch.Tensor, dim: int, states: StateOf) -> None:
    """Remove rows (``dim=0``) or columns (``dim=1``) of a sparse layer not in ``keep``; renumber the pattern."""
    size = layer.out_features if dim == 0 else layer.in_features
    new_number = torch.full((size,), -1, dtype=torch.int64, device=layer.indices.device)
    new_number[keep] = torch.arange(keep.numel(), device=keep.device)
    rows = torch.div(layer.indices, layer.in_features, rounding_mode="floor")
    cols = layer.indices % layer.in_features
    if dim == 0:
        rows = new_number[rows]
        survives = rows >= 0
        layer.out_features = keep.numel()
    else:
        cols = new_number[cols]
        survives = cols >= 0
        layer.in_features = keep.numel()
    entries = survives.nonzero().squeeze(1)
    for state in states(layer.values):
        state.data = state.data[entries]
    layer.values.data = layer.values.data[entries]
    layer.indices = rows[entries] * layer.in_features + cols[entries]  # still row-major sorted
    layer._build_structure()


def shrink_pair(layer: Linearish, following: Linearish, keep: torch.Tensor, states: StateOf = lambda p: []) -> None:
    """Keep only hidden neurons ``keep`` between ``layer`` and ``following``, cutting both in place.

    Args:
        layer: produces the hidden neurons (its output rows are cut).
        following: consumes them (its input columns are cut).
        keep: sorted neuron indices to keep.
        states: the optimizer's per-element state tensors of a parameter (cut the same way).
    """
    if isinstance(layer, SparseLinear):
        _cut_sparse(layer, keep, 0, states)
    else:
        _cut(layer.weight, keep, 0, states)
        layer.out_features = keep.numel()
    if layer.bias is not None:
        _cut(layer.bias, keep, 0, states)
    if isinstance(following, SparseLinear):
        _cut_sparse(following, keep, 1, states)
    else:
        _cut(following.weight, keep, 1, states)
        following.in_features = keep.numel()
