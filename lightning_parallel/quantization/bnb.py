"""bitsandbytes helpers: frozen low-bit Linear layers and 8-bit optimizers, imported lazily.

``import lightning_parallel`` never imports bitsandbytes; each helper imports it on first use and raises
``ModuleNotFoundError`` with the install command when it is missing.

Design decisions:

- Only ``nn.Linear`` layers are swapped (bitsandbytes has no Conv2d); their weights are frozen and stored
  as int8 (LLM.int8 row-wise absmax) or NF4 (block-wise), their biases and every other parameter keep
  training. The layers work on CPU and CUDA (bitsandbytes >= 0.46).
- The swapped layers save their weight *dequantized to float32* under the usual ``weight`` key and requantize
  it on load, so the model's ``state_dict`` keeps the float model's keys and shapes (Lightning restores model
  weights before the precision plugin converts the model). Requantizing a dequantized weight gives back the
  same codes (int8: exactly; NF4: up to the rounding of its double-quantized block statistics).
- Optimizers: ``torch.optim.Adam`` becomes ``bnb.optim.Adam8bit``, ``AdamW`` (or ``Adam`` with
  ``decoupled_weight_decay``) ``AdamW8bit``, ``SGD`` with momentum ``SGD8bit``, with the same parameter groups
  and hyperparameters. bitsandbytes keeps the state of tensors under 4,096 elements in 32 bit. Measured with
  bitsandbytes 0.50 on CPU: its ``Adam8bit`` decays weights decoupled (AdamW-style), unlike ``torch.optim.Adam``,
  so swapping an ``Adam`` with ``weight_decay > 0`` warns.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Literal

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_parallel.quantization.convert import find_layers, replace_layers

INSTALL_HINT = 'pip install "lightning-parallel[quant]"'


def require_bitsandbytes(feature: str = "this feature") -> ModuleType:
    """Import and return ``bitsandbytes``, or raise ``ModuleNotFoundError`` with the install command.

    Args:
        feature: what needs bitsandbytes, for the message.
    """
    try:
        import bitsandbytes
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"{feature} requires the bitsandbytes package, which is not installed. Install it with: {INSTALL_HINT}"
        ) from err
    return bitsandbytes


def convert_to_bnb(
    module: nn.Module,
    *,
    quant_type: Literal["int8", "nf4"],
    ignore_modules: Sequence[str] = (),
    threshold: float = 0.0,
    compute_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Replace the layers of ``module`` that the layer registry can freeze (``nn.Linear``) by frozen
    bitsandbytes layers, in place.

    Args:
        module: the float model.
        quant_type: ``"int8"`` (LLM.int8) or ``"nf4"`` (4-bit NormalFloat, block-wise).
        ignore_modules: ``fnmatch`` patterns of module names to keep in float.
        threshold: LLM.int8 outlier threshold; inputs above it are multiplied in 16 bit. 0 disables it.
        compute_dtype: dtype of the NF4 matrix multiplication.

    Returns:
        The converted model.
    """
    if quant_type not in ("int8", "nf4"):
        raise ValueError(f"quant_type={quant_type!r} is not supported; use 'int8' or 'nf4'.")
    require_bitsandbytes(f"quant_type={quant_type!r}")
    new: dict[str, nn.Module] = {}
    for name, layer, layer_type in find_layers(module, ignore_modules, "bnb"):
        assert layer_type.to_bnb is not None  # find_layers keeps only those
        new[name] = layer_type.to_bnb(
            layer, quant_type=quant_type, threshold=threshold, compute_dtype=compute_dtype
        )
    return replace_layers(module, new)


def _bnb_class(bnb: ModuleType, optimizer: Optimizer) -> type[Optimizer]:
    name = type(optimizer).__name__
    defaults = optimizer.defaults
    if any(g.get("maximize") or g.get("amsgrad") for g in optimizer.param_groups):
        raise ValueError(
            f"optimizer='adam8bit' cannot replace {name} with maximize or amsgrad set; unset them."
        )
    if isinstance(optimizer, torch.optim.AdamW) or (
        isinstance(optimizer, torch.optim.Adam) and defaults.get("decoupled_weight_decay")
    ):
        return bnb.optim.AdamW8bit  # type: ignore[no-any-return]
    if isinstance(optimizer, torch.optim.Adam):
        decay = defaults.get("weight_decay", 0.0)
        if decay:
            warnings.warn(
                f"bitsandbytes' Adam8bit applies weight_decay={decay} decoupled (like AdamW), while torch.optim.Adam "
                "adds it to the gradient; use AdamW in configure_optimizers to make the two runs comparable.",
                stacklevel=3,
            )
        return bnb.optim.Adam8bit  # type: ignore[no-any-return]
    if isinstance(optimizer, torch.optim.SGD) and defaults.get("momentum", 0) > 0:
        return bnb.optim.SGD8bit  # type: ignore[no-any-return]
    raise ValueError(
        f"optimizer='adam8bit' cannot replace {name}: bitsandbytes 8-bit counterparts exist for "
        "torch.optim.Adam, AdamW and SGD with momentum; use one of those in configure_optimizers."
    )


_HYPERPARAMETERS = {"lr", "betas", "eps", "weight_decay", "momentum", "dampening", "nesterov", "initial_lr"}


def to_8bit_optimizer(optimizer: Optimizer) -> Optimizer:
    """A bitsandbytes 8-bit optimizer over the same parameter groups with the same hyperparameters.

    Args:
        optimizer: a ``torch.optim.Adam``, ``AdamW`` or ``SGD`` (with momentum) optimizer. Its state, if
            any, is not carried over.
    """
    bnb = require_bitsandbytes("optimizer='adam8bit'")
    if type(optimizer).__module__.startswith("bitsandbytes"):
        return optimizer
    cls = _bnb_class(bnb, optimizer)
    groups: list[dict[str, Any]] = []
    for group in optimizer.param_groups:
        kept = {k: v for k, v in group.items() if k in _HYPERPARAMETERS}
        kept["params"] = list(group["params"])
        groups.append(kept)
    defaults = {k: v for k, v in optimizer.defaults.items() if k in _HYPERPARAMETERS and k != "initial_lr"}
    if "lr" in defaults and isinstance(defaults["lr"], torch.Tensor):
        defaults["lr"] = float(defaults["lr"])
    return cls(groups, **defaults)


def retarget_scheduler(scheduler: Any, old: Optimizer, new: Optimizer) -> None:
    """Point an LR scheduler (and any schedulers it chains) from ``old`` to ``new``.

    Args:
        scheduler: a ``torch.optim.lr_scheduler.LRScheduler`` (or ``ReduceLROnPlateau``).
        old: the optimizer it was built on.
        new: the replacement optimizer.
    """
    if getattr(scheduler, "optimizer", None) is old:
        scheduler.optimizer = new
        _mark_step_tracked(new)
    for inner in getattr(scheduler, "_schedulers", []):
        retarget_scheduler(inner, old, new)


def _mark_step_tracked(optimizer: Optimizer) -> None:
    # LRScheduler wraps optimizer.step to detect "scheduler.step() before optimizer.step()"; mirror that on the
    # replacement so the scheduler neither warns nor misses the first step.
    step = optimizer.step
    if hasattr(step, "_wrapped_by_lr_sched"):
        return

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        optimizer._opt_called = True  # type: ignore[attr-defined]
        return step(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = wrapper  # type: ignore[method-assign]


def optimizer_state_bytes(optimizer: Optimizer) -> int:
    """Bytes held by the tensors of ``optimizer.state`` (moments, quantization maps, absmax)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total
