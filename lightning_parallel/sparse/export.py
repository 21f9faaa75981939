"""Export helpers: the dense-with-zeros or the sparse form of a trained model, and shrunk-shape loading."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_parallel.sparse.sparse_linear import SparseLinear


def _replace_all(model: nn.Module, convert: Any) -> nn.Module:
    for name, module in list(model.named_modules()):
        new = convert(module)
        if new is not None and name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def export_dense(model: nn.Module) -> nn.Module:
    """A copy with every :class:`SparseLinear` turned into an ``nn.Linear`` holding the dense-with-zeros weight."""
    return _replace_all(copy.deepcopy(model), lambda m: m.to_linear() if isinstance(m, SparseLinear) else None)


def export_sparse(model: nn.Module, *, max_density: float = 0.5) -> nn.Module:
    """A copy with every plain ``nn.Linear`` of density at most ``max_density`` stored as a :class:`SparseLinear`.

    Args:
        model: a trained model (masked layers have exact zeros off their masks; neuron pruning shrank the shapes).
        max_density: layers with more nonzeros than this fraction stay dense. Default 0.5.
    """

    def convert(module: nn.Module) -> nn.Module | None:
        if type(module) is nn.Linear:
            mask = module.weight.detach() != 0
            if mask.float().mean() <= max_density:
                return SparseLinear.from_linear(module, mask)
        return None

    return _replace_all(copy.deepcopy(model), convert)


def densify_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Turn the ``values``/``indices``/``_extra_state`` entries of sparse layers into dense ``weight`` entries."""
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith(".indices") and k[: -len("indices")] + "values" in state_dict]:
        prefix = key[: -len("indices")]
        shape = out.pop(prefix + "_extra_state")
        indices, values = out.pop(prefix + "indices"), out.pop(prefix + "values")
        weight = torch.zeros(shape["out_features"] * shape["in_features"], dtype=values.dtype)
        weight[indices] = values
        out[prefix + "weight"] = weight.view(shape["out_features"], shape["in_features"])
    return out


@torch.no_grad()
def resize_to_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> list[str]:
    """Give every ``nn.Linear`` the shape its dense ``weight`` has in ``state_dict`` (neuron-pruned checkpoints).

    Returns the names of the layers resized, so ``model.load_state_dict(state_dict)`` then fits.
    """
    resized = []
    for name, module in model.named_modules():
        weight = state_dict.get(f"{name}.weight")
        if type(module) is nn.Linear and weight is not None and weight.shape != module.weight.shape:
            module.out_features, module.in_features = weight.shape
            module.weight.data = torch.empty_like(weight, device=module.weight.device, dtype=module.weight.dtype)
            if module.bias is not None:
                module.bias.data = torch.empty(weight.shape[0], device=module.bias.device, dtype=module.bias.dtype)
            resized.append(name)
    return resized
