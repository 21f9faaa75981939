"""Module swapping: turn a float model into a quantization-aware one.

Layers are selected by type, through the layer registry (:mod:`lightning_parallel.layers.registry`:
``nn.Linear`` and ``nn.Conv2d`` including subclasses, Hugging Face ``Conv1D``, ``nn.MultiheadAttention``, and
any type a user registers), and by qualified name (``model.named_modules()`` names such as ``"blocks.0.conv1"``). Name patterns use ``fnmatch`` syntax
(``"blocks.*.mlp.*"``); a pattern also covers everything below the module it names, so ``"head"``
ignores ``"head.fc"``. Every pattern must match at least one module, so a typo fails loudly instead of
silently quantizing a layer meant to stay in float.

``nn.MultiheadAttention`` is converted as a whole (its ``out_proj`` is read by the attention, never called, so
swapping it alone would change nothing). Converted layers are never converted again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Literal

from torch import nn

from lightning_parallel.layers.registry import (
    Coverage,
    LayerType,
    layer_types,
    matched_modules,
    weight_coverage,
)
from lightning_parallel.quantization.fake_quantize import quant_range
from lightning_parallel.quantization.quantizer_base import QuantizerBase


def name_matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` or one of its parents matches one of the ``fnmatch`` ``patterns``."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatchcase(p, pattern) for pattern in patterns for p in prefixes)


def check_patterns(module: nn.Module, patterns: Sequence[str], argument: str) -> None:
    """Raise ``ValueError`` if a pattern of ``argument`` matches no module name of ``module``.

    Args:
        module: the model.
        patterns: ``fnmatch`` patterns over qualified module names.
        argument: the argument's name, for the message.
    """
    names = [name for name, _ in module.named_modules() if name]
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in names):
            sample = ", ".join(repr(n) for n in names[:8])
            raise ValueError(
                f"{argument} has pattern {pattern!r} that matches no module of {type(module).__name__}; "
                f"module names look like {sample}{', ...' if len(names) > 8 else ''}."
            )


def is_converted(module: nn.Module) -> bool:
    """Whether ``module`` is one of our QAT, exported or bitsandbytes layers (their class says so)."""
    return bool(getattr(type(module), "converted", False))


def converted_coverage(module: nn.Module, feature: str) -> Coverage:
    """How many of ``module``'s weight parameters sit in converted layers (by count and by bytes).

    Args:
        module: a converted model.
        feature: the feature's name, for messages.
    """
    quantizers = [p for sub in module.modules() if isinstance(sub, QuantizerBase) for p in sub.parameters()]
    covered = [p for sub in module.modules() if is_converted(sub) for p in sub.parameters()]
    return weight_coverage(module, covered, feature, ignore=quantizers)


def find_layers(
    module: nn.Module,
    ignore_modules: Sequence[str],
    purpose: Literal["qat", "bnb"],
    argument: str = "model",
) -> list[tuple[str, nn.Module, LayerType]]:
    """The ``(name, layer, type)`` of the layers of ``module`` that the registry can convert for ``purpose``.

    Layers matched by ``ignore_modules`` and already converted layers are left out. Raises ``ValueError``
    when there is none.

    Args:
        module: the model.
        ignore_modules: ``fnmatch`` patterns of modules to leave alone.
        purpose: ``"qat"`` (types with a QAT replacement) or ``"bnb"`` (types with a bitsandbytes one).
        argument: how to name the model in error messages.
    """
    check_patterns(module, ignore_modules, "ignore_modules")
    attribute = f"to_{purpose}"
    found = [
        (name, layer, layer_type)
        for name, layer, layer_type in matched_modules(
            module, lambda name, layer: is_converted(layer) or name_matches(name, ignore_modules)
        )
        if getattr(layer_type, attribute) is not None
    ]
    if not found:
        names = [t.name.removeprefix("nn.").split()[-1] for t in layer_types() if getattr(t, attribute)]
        kinds = " or ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " or " + names[-1]
        raise ValueError(
            f"{argument} {type(module).__name__} has no {kinds} layer to quantize "
            f"(ignore_modules={list(ignore_modules)}); use a model with such layers or ignore fewer modules."
        )
    return found


def replace_layers(module: nn.Module, new_layers: Mapping[str, nn.Module]) -> nn.Module:
    """Put each ``new_layers[name]`` in place of the submodule ``name``; returns the (new) root.

    ``nn.TransformerEncoderLayer``s that then hold a converted layer lose their evaluation fast path
    (:func:`disable_encoder_fast_path`).
    """
    for name, layer in new_layers.items():
        if not name:
            return layer
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child, layer)
    disable_encoder_fast_path(module)
    return module


def disable_encoder_fast_path(module: nn.Module) -> int:
    """Turn off the evaluation fast path of every ``nn.TransformerEncoderLayer`` that holds a converted layer.

    In ``eval()`` without gradients, ``nn.TransformerEncoderLayer`` (and ``nn.TransformerEncoder``) call one
    fused kernel with the *float* weights of the attention and of ``linear1``/``linear2``, which skips the
    fake quantizers (and breaks on integer or bitsandbytes weights). Their own switch for it is the
    ``activation_relu_or_gelu`` flag (the activation itself stays ``activation``); it is set to 0 here.

    Args:
        module: the model.

    Returns:
        How many encoder layers were switched.
    """
    switched = 0
    for sub in module.modules():
        converted = isinstance(sub, nn.TransformerEncoderLayer) and any(
            is_converted(m) for m in sub.modules()
        )
        if converted and sub.activation_relu_or_gelu:
            sub.activation_relu_or_gelu = 0  # type: ignore[assignment]
            switched += 1
    return switched


def resolve_bits(name: str, default: int, module_bits: Mapping[str, int]) -> int:
    """The weight bit width of layer ``name``: the first matching pattern of ``module_bits``, else ``default``."""
    for pattern, bits in module_bits.items():
        if name_matches(name, [pattern]):
            return bits
    return default


def convert_to_qat(
    module: nn.Module,
    *,
    weight_bits: int = 8,
    act_bits: int | None = 8,
    group_size: int | None = None,
    ignore_modules: Sequence[str] = (),
    module_bits: Mapping[str, int] | None = None,
) -> nn.Module:
    """Swap every layer of ``module`` that the layer registry knows for its QAT counterpart, in place.

    Args:
        module: the float model.
        weight_bits: default weight bit width, 2 to 8.
        act_bits: input (activation) bit width, 2 to 8, or ``None`` to keep activations in float.
        group_size: group size for layers whose weights get 4 bits or fewer; ``None`` (and any layer with more
            bits) uses one step size per output channel.
        ignore_modules: ``fnmatch`` patterns of module names to keep in float (e.g. the first conv, the head).
        module_bits: ``{pattern: bits}`` overriding ``weight_bits`` per module; the first matching pattern wins.

    Returns:
        The converted model (the same object unless ``module`` itself is a single layer).
    """
    module_bits = dict(module_bits or {})
    quant_range(weight_bits)
    if act_bits is not None:
        quant_range(act_bits)
    for pattern, bits in module_bits.items():
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(
                f"module_bits[{pattern!r}]={bits!r} is not supported; use an integer from 2 to 8."
            )
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size={group_size!r} must be a positive integer (for example 64) or None.")
    check_patterns(module, list(module_bits), "module_bits")
    new: dict[str, nn.Module] = {}
    for name, layer, layer_type in find_layers(module, ignore_modules, "qat"):
        assert layer_type.to_qat is not None  # find_layers keeps only those
        bits = resolve_bits(name, weight_bits, module_bits)
        groups = group_size if bits <= 4 else None
        new[name] = layer_type.to_qat(layer, weight_bits=bits, act_bits=act_bits, group_size=groups)
    return replace_layers(module, new)
