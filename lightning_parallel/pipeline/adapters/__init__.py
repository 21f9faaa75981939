"""Adapters: the pipeline protocol for modules that do not implement it (see :mod:`.base`).

A pipeline strategy picks the adapter in ``setup`` (:func:`resolve_adapter`), in this order:

1. the module implements the protocol itself: no adapter (giving one as well is refused);
2. ``adapter=`` a :class:`PipelineAdapter` instance, or a registered name (:data:`ADAPTERS`: ``"hf"``, and
   whatever other paths register), or ``"hf:ATTRIBUTE"`` for a Hugging Face model at a named attribute;
3. ``blocks="model.layers"`` (with ``pre=``, ``post=``, ``loss=``): a sequential trunk
   (:class:`~lightning_parallel.pipeline.adapters.trunk.SequentialTrunkAdapter`);
4. nothing given, and the module holds a Hugging Face ``PreTrainedModel`` (only looked for when
   ``transformers`` is already imported): the ``"hf"`` adapter;
5. otherwise the protocol's ``TypeError``, which names these options.

Adapters are imported lazily by name, so ``import lightning_parallel`` never imports ``transformers``.
This package imports no Lightning.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Any

from torch import nn

from lightning_parallel.pipeline.adapters.base import (
    ADAPTER_ATTRIBUTE,
    PipelineAdapter,
    SampleBatch,
    adapted_by,
    install_adapter,
    pack_channels,
    resolve_attribute,
    unpack_channels,
)
from lightning_parallel.pipeline.protocol import missing_pipeline_hooks

ADAPTERS: dict[str, str] = {
    "hf": "lightning_parallel.pipeline.adapters.hf:HFCausalLMAdapter",
    "traced": "lightning_parallel.pipeline.adapters.traced:TracedAdapter",
}
"""Registered adapter names -> ``"module:Class"`` (built with no arguments); add a line to register one."""


def check_adapter_options(
    *,
    adapter: str | PipelineAdapter | None,
    blocks: str | None,
    pre: str | Sequence[str] | None,
    post: str | Sequence[str] | None,
    loss: str | None,
    split_points: str | Sequence[str] | None = None,
) -> None:
    """Validate a strategy's adapter options in its ``__init__`` (before any module exists).

    Raises:
        TypeError: for an option of the wrong type.
        ValueError: for an unknown adapter name, or ``pre``/``post``/``loss`` without ``blocks``.
    """
    if adapter is not None and not isinstance(adapter, (str, PipelineAdapter)):
        raise TypeError(
            f"adapter={adapter!r} must be a name ({', '.join(sorted(ADAPTERS))}, 'hf:ATTRIBUTE') or a PipelineAdapter."
        )
    if isinstance(adapter, str) and adapter.split(":", 1)[0] not in ADAPTERS:
        raise ValueError(
            f"adapter={adapter!r} is not one of {sorted(ADAPTERS)} (or 'hf:ATTRIBUTE'); for a Sequential/ModuleList "
            "trunk use blocks='ATTRIBUTE' instead."
        )
    if blocks is not None and (not isinstance(blocks, str) or not blocks):
        raise TypeError(f"blocks={blocks!r} must be the dotted name of an nn.Sequential/nn.ModuleList, e.g. 'model.layers'.")
    for name, value in (("pre", pre), ("post", post)):
        names = [value] if isinstance(value, str) else value
        if names is not None and (
            not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names)
        ):
            raise TypeError(f"{name}={value!r} must be a dotted name or a list of them, e.g. ['embed', 'drop'].")
    if loss is not None and (not isinstance(loss, str) or not loss):
        raise TypeError(f"loss={loss!r} must be a name such as 'cross_entropy' or one of the module's methods.")
    traced = split_points is not None or (isinstance(adapter, str) and adapter.split(":", 1)[0] == "traced")
    if split_points is not None:
        if not (split_points == "auto" or (not isinstance(split_points, str) and all(isinstance(n, str) and n for n in split_points))):
            raise TypeError(f"split_points={split_points!r} must be 'auto' or a list of submodule names, e.g. ['layers.2'].")
        if blocks is not None or (adapter is not None and not traced):
            raise ValueError(
                f"split_points={split_points!r} splits the module by tracing; it cannot be combined with "
                f"blocks={blocks!r} or adapter={adapter!r}. Give one way to split the module."
            )
    if traced and (pre is not None or post is not None):
        raise ValueError(f"pre={pre!r} and post={post!r} describe a sequential trunk (blocks=); a traced split has none.")
    if blocks is None and not traced and (pre is not None or post is not None or loss is not None):
        raise ValueError(
            f"pre={pre!r}, post={post!r}, loss={loss!r} describe a sequential trunk and need blocks='ATTRIBUTE' "
            "(e.g. blocks='model.layers')."
        )
    if blocks is not None and adapter is not None:
        raise ValueError(f"blocks={blocks!r} and adapter={adapter!r} both given; give one of them.")


def adapter_by_name(name: str) -> PipelineAdapter:
    """Build a registered adapter (``"hf"``, ``"hf:ATTRIBUTE"``, ...), importing its module only now."""
    key, _, argument = name.partition(":")
    module_name, _, class_name = ADAPTERS[key].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(argument) if argument else cls()  # type: ignore[no-any-return]


def find_hf_model(module: nn.Module) -> str | None:
    """The name of the first submodule that is a Hugging Face ``PreTrainedModel`` (``None`` if there is none,
    or if ``transformers`` has not been imported: it is never imported here)."""
    transformers: Any = sys.modules.get("transformers")
    if transformers is None:
        return None
    base = getattr(transformers, "PreTrainedModel", None)
    if base is None:
        return None
    for name, sub in module.named_modules():
        if name and isinstance(sub, base):
            return name
    return None


def resolve_adapter(
    module: nn.Module,
    *,
    adapter: str | PipelineAdapter | None = None,
    blocks: str | None = None,
    pre: str | Sequence[str] | None = None,
    post: str | Sequence[str] | None = None,
    loss: str | None = None,
    split_points: str | Sequence[str] | None = None,
) -> PipelineAdapter | None:
    """The adapter that supplies ``module``'s pipeline protocol, or ``None`` when it needs none (see the module
    docstring for the order); raises nothing itself when there is none: the protocol check does."""
    if isinstance(adapter, PipelineAdapter):
        return adapter
    if split_points is not None or (isinstance(adapter, str) and adapter.split(":", 1)[0] == "traced"):
        from lightning_parallel.pipeline.adapters.traced import TracedAdapter

        traced_module = adapter.partition(":")[2] if isinstance(adapter, str) else ""
        return TracedAdapter(traced_module or None, split_points="auto" if split_points is None else split_points,
                             loss=loss or "cross_entropy")
    if isinstance(adapter, str):
        return adapter_by_name(adapter)
    if blocks is not None:
        from lightning_parallel.pipeline.adapters.trunk import SequentialTrunkAdapter

        return SequentialTrunkAdapter(blocks, pre=pre, post=post, loss=loss or "cross_entropy")
    previous = adapted_by(module)
    if previous is not None:
        return previous  # set up before (fit, then test): the same adapter again
    if not missing_pipeline_hooks(module):
        return None
    attribute = find_hf_model(module)
    if attribute is not None:
        return adapter_by_name(f"hf:{attribute}")
    return None


__all__ = [
    "ADAPTERS",
    "ADAPTER_ATTRIBUTE",
    "PipelineAdapter",
    "SampleBatch",
    "adapted_by",
    "adapter_by_name",
    "check_adapter_options",
    "find_hf_model",
    "install_adapter",
    "pack_channels",
    "resolve_adapter",
    "resolve_attribute",
    "unpack_channels",
]
