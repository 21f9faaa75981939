"""Module swapping: turn a float model into a quantization-aware one.

Layers are selected by type (``nn.Linear`` and ``nn.Conv2d``, including subclasses) and by qualified name
(``model.named_modules()`` names such as ``"blocks.0.conv1"``). Name patterns use ``fnmatch`` syntax
(``"blocks.*.mlp.*"``); a pattern also covers everything below the module it names, so ``"head"``
ignores ``"head.fc"``. Every pattern must match at least one module, so a typo fails loudly instead of
silently quantizing a layer meant to stay in float.

Linear layers inside ``nn.MultiheadAttention`` are skipped: that module reads ``out_proj.weight`` directly,
so a swapped layer would never be called.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase

from torch import nn

from lightning_parallel.quantization.fake_quantize import quant_range
from lightning_parallel.quantization.qat_layers import QATConv2d, QATLinear

QAT_LAYERS = (QATLinear, QATConv2d)


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


def find_layers(
    module: nn.Module,
    ignore_modules: Sequence[str],
    types: tuple[type[nn.Module], ...],
    argument: str = "model",
) -> list[tuple[str, nn.Module]]:
    """The ``(name, layer)`` pairs of ``types`` in ``module`` that ``ignore_modules`` does not exclude.

    Raises ``ValueError`` when there is none.

    Args:
        module: the model.
        ignore_modules: ``fnmatch`` patterns of modules to leave alone.
        types: layer types to select.
        argument: how to name the model in error messages.
    """
    check_patterns(module, ignore_modules, "ignore_modules")
    skip_below = [name for name, m in module.named_modules() if isinstance(m, nn.MultiheadAttention)]
    found = []
    for name, layer in module.named_modules():
        if type(layer) in QAT_LAYERS or not isinstance(layer, types):
            continue
        if any(name.startswith(p + ".") for p in skip_below) or name_matches(name, ignore_modules):
            continue
        found.append((name, layer))
    if not found:
        kinds = " or ".join(t.__name__ for t in types)
        raise ValueError(
            f"{argument} {type(module).__name__} has no {kinds} layer to quantize "
            f"(ignore_modules={list(ignore_modules)}); use a model with such layers or ignore fewer modules."
        )
    return found


def replace_layers(module: nn.Module, new_layers: Mapping[str, nn.Module]) -> nn.Module:
    """Put each ``new_layers[name]`` in place of the submodule ``name``; returns the (new) root."""
    for name, layer in new_layers.items():
        if not name:
            return layer
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child, layer)
    return module


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
    """Swap every ``nn.Linear``/``nn.Conv2d`` of ``module`` for its QAT counterpart, in place.

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
    layers = find_layers(module, ignore_modules, (nn.Linear, nn.Conv2d))
    new: dict[str, nn.Module] = {}
    for name, layer in layers:
        bits = resolve_bits(name, weight_bits, module_bits)
        groups = group_size if bits <= 4 else None
        factory: Callable[..., nn.Module] = (
            QATConv2d.from_float if isinstance(layer, nn.Conv2d) else QATLinear.from_float
        )
        new[name] = factory(layer, weight_bits=bits, act_bits=act_bits, group_size=groups)
    return replace_layers(module, new)
