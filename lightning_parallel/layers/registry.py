"""One registry of linear-like layer types: how to read a layer's input, output gradient and weight.

K-FAC (:mod:`lightning_parallel.kfac`) and quantization (:mod:`lightning_parallel.quantization`) both need to
know, for every layer that multiplies its input by a weight matrix, where that weight lives, how it is laid
out and how to see the layer's input and output. A :class:`LayerType` says so once per module type; it turns
a module into :class:`LinearTarget` objects (one weight matrix each) and, optionally, into a QAT layer or a
frozen bitsandbytes layer. :func:`register_layer_type` adds a user's own type. This module imports no
Lightning and no optional package: Hugging Face's ``Conv1D`` is recognised by its class name and module.

Built-in types, tried in order (the first match wins):

- ``nn.MultiheadAttention``: four targets, ``<name>.in_proj.q``/``.k``/``.v`` (row blocks of
  ``in_proj_weight``, or ``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ) and ``<name>.out_proj``; seen
  through :mod:`~lightning_parallel.layers.attention` (torch applies them without calling any submodule).
  Its ``out_proj`` submodule is therefore claimed by the attention and not matched again as an ``nn.Linear``.
- Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2's attention and MLP): ``y = x @ W + b`` with
  ``W`` stored ``(in, out)``, i.e. a linear layer whose weight is transposed.
- ``nn.Linear`` (and subclasses), ``nn.Conv2d``.

Coverage: :func:`weight_coverage` counts the model's weight parameters (tensors of two or more dimensions,
embeddings included, tied parameters once) that the targets cover, by count and by bytes, and names the
largest ones left out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_parallel.layers.attention import add_projection_hook

#: ``observer(input, output)``: called at each forward of a target with its input and its output.
Observer = Callable[[Tensor, Tensor], None]


class RemovableObservation:
    """A handle over one or more hook handles; ``remove()`` removes them all.

    Args:
        handles: objects with a ``remove()`` method.
    """

    def __init__(self, *handles: Any) -> None:
        self.handles = handles

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self.handles:
            handle.remove()


@dataclass(eq=False)
class LinearTarget:
    """One weight matrix used as ``y = x W^T + b`` (or as a convolution) by a module.

    Args:
        name: a qualified name for messages and checkpoints (the module's name, or ``<module>.<part>``).
        module: the module whose forward applies the weight.
        weight: the parameter holding the weight.
        bias: the parameter holding the bias, or ``None``.
        rows: ``(start, stop)``: the rows of ``weight`` this target covers, or ``None`` for all.
        bias_rows: the same for ``bias`` (``nn.MultiheadAttention`` packs three biases even when it keeps
            three weights).
        transposed: whether ``weight`` is stored ``(in, out)`` (Hugging Face ``Conv1D``).
        conv: the ``nn.Conv2d`` whose geometry applies the weight, or ``None`` for a linear map.
        observe: ``observe(observer) -> handle``: call ``observer(input, output)`` at each forward.
    """

    name: str
    module: nn.Module
    weight: Tensor
    bias: Tensor | None
    observe: Callable[[Observer], RemovableObservation]
    rows: tuple[int, int] | None = None
    bias_rows: tuple[int, int] | None = None
    transposed: bool = False
    conv: nn.Conv2d | None = None

    def matrix(self, tensor: Tensor) -> Tensor:
        """The ``(out, in)`` view of ``tensor``, a tensor shaped like ``weight`` (the weight or its gradient)."""
        mat = tensor.t() if self.transposed else tensor.reshape(tensor.shape[0], -1)
        return mat if self.rows is None else mat[self.rows[0] : self.rows[1]]

    def bias_part(self, tensor: Tensor) -> Tensor:
        """The rows of ``tensor`` (shaped like ``bias``) that belong to this target."""
        return tensor if self.bias_rows is None else tensor[self.bias_rows[0] : self.bias_rows[1]]

    @property
    def out_features(self) -> int:
        """Rows of the ``(out, in)`` weight matrix."""
        return int(self.matrix(self.weight).shape[0])

    @property
    def in_features(self) -> int:
        """Columns of the ``(out, in)`` weight matrix (input features times kernel positions)."""
        return int(self.matrix(self.weight).shape[1])


@dataclass(frozen=True)
class LayerType:
    """How to handle one kind of module.

    Args:
        name: a short name for messages (``"nn.Linear"``).
        matches: ``matches(module) -> bool``.
        targets: ``targets(name, module) -> [LinearTarget]``: the weight matrices of a matched module
            (an empty list leaves it uncovered, e.g. a grouped convolution K-FAC has no factors for).
        to_qat: ``to_qat(module, weight_bits=, act_bits=, group_size=) -> module``: its QAT replacement, or
            ``None`` if quantization-aware training does not cover the type.
        to_bnb: ``to_bnb(module, quant_type=, threshold=, compute_dtype=) -> module``: its frozen
            bitsandbytes replacement, or ``None``.
        claims: ``claims(module) -> [submodule]``: submodules that this type handles itself and that must not
            be matched on their own (``nn.MultiheadAttention.out_proj``).
        kfac: whether K-FAC preconditions the targets (default ``True``).
    """

    name: str
    matches: Callable[[nn.Module], bool]
    targets: Callable[[str, nn.Module], list[LinearTarget]]
    to_qat: Callable[..., nn.Module] | None = None
    to_bnb: Callable[..., nn.Module] | None = None
    claims: Callable[[nn.Module], Sequence[nn.Module]] = field(default=lambda module: ())
    kfac: bool = True


_REGISTRY: list[LayerType] = []


def register_layer_type(layer_type: LayerType, *, first: bool = True) -> None:
    """Teach K-FAC and quantization a new layer type.

    A model's module is handled by the first registered type that matches it; a user's type is tried before
    the built-in ones unless ``first=False``. Registering a type with the name of a registered one replaces it.

    Args:
        layer_type: the type (see :class:`LayerType`; :func:`linear_target` builds the target of a layer with
            a ``weight`` of shape ``(out, in)`` and an optional ``bias``, read by a forward hook).
        first: try it before the registered types (default) or after them.
    """
    if not isinstance(layer_type, LayerType):
        raise TypeError(
            f"layer_type={layer_type!r} is not a LayerType; build one with LayerType(name=..., matches=..., "
            "targets=...)."
        )
    _REGISTRY[:] = [t for t in _REGISTRY if t.name != layer_type.name]
    _REGISTRY.insert(0 if first else len(_REGISTRY), layer_type)


def unregister_layer_type(name: str) -> None:
    """Forget the registered type called ``name`` (a built-in one too).

    Args:
        name: the type's ``name``.
    """
    if all(t.name != name for t in _REGISTRY):
        raise ValueError(
            f"name={name!r} is not a registered layer type; registered: {[t.name for t in _REGISTRY]}."
        )
    _REGISTRY[:] = [t for t in _REGISTRY if t.name != name]


def layer_types() -> list[LayerType]:
    """The registered layer types, in the order they are tried."""
    return list(_REGISTRY)


def find_layer_type(module: nn.Module) -> LayerType | None:
    """The first registered type matching ``module``, or ``None``."""
    return next((t for t in _REGISTRY if t.matches(module)), None)


def matched_modules(
    model: nn.Module, skip: Callable[[str, nn.Module], bool] = lambda name, module: False
) -> list[tuple[str, nn.Module, LayerType]]:
    """``(name, module, type)`` of every module of ``model`` a registered type matches, in model order.

    Modules claimed by a matched parent (``nn.MultiheadAttention.out_proj``) are left out; so is everything
    ``skip(name, module)`` rejects (with what lies below it only when the type claims it).

    Args:
        model: the model.
        skip: ``skip(name, module) -> bool`` for modules to leave alone.
    """
    claimed: set[int] = set()
    found = []
    for name, module in model.named_modules():
        if id(module) in claimed:
            continue
        layer_type = find_layer_type(module)
        if layer_type is None:
            continue
        claimed.update(id(m) for m in layer_type.claims(module))
        if not skip(name, module):
            found.append((name, module, layer_type))
    return found


def find_targets(
    model: nn.Module, skip: Callable[[str, nn.Module], bool] = lambda name, module: False
) -> list[LinearTarget]:
    """The K-FAC targets of ``model``: those of every matched module whose type has ``kfac=True``.

    Args:
        model: the model.
        skip: ``skip(name, module) -> bool`` for modules to leave alone.
    """
    targets: list[LinearTarget] = []
    for name, module, layer_type in matched_modules(model, skip):
        if layer_type.kfac:
            targets.extend(layer_type.targets(name, module))
    return targets


# ---------------------------------------------------------------------- coverage


@dataclass
class Coverage:
    """How much of a model's weight parameters a feature covers.

    Args:
        feature: the feature's name, for messages.
        covered_count: covered weight parameters.
        total_count: weight parameters of the model (tensors with two or more dimensions, tied ones once).
        covered_bytes: their bytes.
        total_bytes: bytes of all weight parameters.
        skipped: ``(name, bytes)`` of the uncovered weight parameters, largest first.
    """

    feature: str
    covered_count: int
    total_count: int
    covered_bytes: int
    total_bytes: int
    skipped: list[tuple[str, int]]

    @property
    def fraction(self) -> float:
        """Covered share of the weight bytes (1.0 for a model without weights)."""
        return self.covered_bytes / self.total_bytes if self.total_bytes else 1.0

    def summary(self, largest: int = 3) -> str:
        """One line: counts, bytes and the largest uncovered parameters."""
        text = (
            f"{self.feature} covers {self.covered_count} of {self.total_count} weight parameters, "
            f"{_mib(self.covered_bytes)} of {_mib(self.total_bytes)} ({100 * self.fraction:.1f}% of the weight bytes)"
        )
        if self.skipped:
            names = ", ".join(f"{n} ({_mib(b)})" for n, b in self.skipped[:largest])
            more = f" and {len(self.skipped) - largest} more" if len(self.skipped) > largest else ""
            text += f"; not covered: {names}{more}"
        return text

    def warning(self, largest: int = 3) -> str | None:
        """A warning when less than half of the weight bytes are covered, else ``None``."""
        if self.fraction >= 0.5:
            return None
        names = ", ".join(f"{n} ({_mib(b)})" for n, b in self.skipped[:largest])
        return (
            f"{self.feature} covers only {100 * self.fraction:.1f}% of the model's weight bytes; the largest "
            f"weights left out are {names}. Register their layer type with "
            "lightning_parallel.layers.register_layer_type, or check that this is what you want."
        )

    def report(self, info: Callable[[str], Any], warn: Callable[[str], Any]) -> None:
        """Log :meth:`summary` through ``info`` and, below half of the weight bytes, :meth:`warning` through
        ``warn`` (a Lightning adapter passes ``rank_zero_info`` and ``rank_zero_warn``)."""
        info(self.summary())
        message = self.warning()
        if message is not None:
            warn(message)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def weight_coverage(
    model: nn.Module, covered: Iterable[Tensor], feature: str, ignore: Iterable[Tensor] = ()
) -> Coverage:
    """Count the weight parameters of ``model`` that are in ``covered``.

    Args:
        model: the model.
        covered: the covered weight tensors (parameters; duplicates are counted once).
        feature: the feature's name, for messages.
        ignore: parameters that are not model weights (a quantizer's step sizes).
    """
    covered_ids = {id(t) for t in covered}
    ignored = {id(t) for t in ignore}
    covered_count = total_count = covered_bytes = total_bytes = 0
    skipped: list[tuple[str, int]] = []
    for name, param in model.named_parameters():
        if param.dim() < 2 or id(param) in ignored:
            continue
        size = param.numel() * param.element_size()
        total_count += 1
        total_bytes += size
        if id(param) in covered_ids:
            covered_count += 1
            covered_bytes += size
        else:
            skipped.append((name, size))
    skipped.sort(key=lambda item: -item[1])
    return Coverage(feature, covered_count, total_count, covered_bytes, total_bytes, skipped)


# ---------------------------------------------------------------------- built-in types


def _forward_hook_observe(module: nn.Module) -> Callable[[Observer], RemovableObservation]:
    def observe(observer: Observer) -> RemovableObservation:
        def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if inputs and isinstance(inputs[0], Tensor) and isinstance(output, Tensor):
                observer(inputs[0], output)

        return RemovableObservation(module.register_forward_hook(hook))

    return observe


def linear_target(name: str, module: nn.Module, *, transposed: bool = False) -> LinearTarget:
    """The target of a layer with a ``weight`` (``(out, in)``, or ``(in, out)`` if ``transposed``) and a
    ``bias`` attribute, read by a forward hook on its first input and its output.

    Args:
        name: the module's qualified name.
        module: the layer.
        transposed: whether the weight is stored ``(in, out)``.
    """
    weight = module.weight
    if not isinstance(weight, Tensor):
        raise TypeError(f"module {name!r} ({type(module).__name__}) has no weight tensor to cover.")
    bias = getattr(module, "bias", None)
    return LinearTarget(
        name,
        module,
        weight,
        bias if isinstance(bias, Tensor) else None,
        _forward_hook_observe(module),
        transposed=transposed,
        conv=module if isinstance(module, nn.Conv2d) else None,
    )


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's ``Conv1D`` (or our QAT version of it), without importing transformers."""
    cls = type(module)
    if getattr(cls, "transposed_linear", False):
        return True
    return any(
        c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in cls.__mro__
    ) and isinstance(getattr(module, "weight", None), Tensor)


def _attention_targets(name: str, module: nn.Module) -> list[LinearTarget]:
    assert isinstance(module, nn.MultiheadAttention)
    prefix = f"{name}." if name else ""
    embed = module.embed_dim
    bias = module.in_proj_bias
    targets = []
    for index, part in enumerate("qkv"):
        block = (index * embed, (index + 1) * embed)
        if module._qkv_same_embed_dim:
            weight, rows = module.in_proj_weight, block
        else:
            weight, rows = getattr(module, f"{part}_proj_weight"), None
        observe = _projection_observe(module, index)
        targets.append(
            LinearTarget(f"{prefix}in_proj.{part}", module, weight, bias, observe, rows=rows, bias_rows=block)
        )
    out = module.out_proj
    targets.append(
        LinearTarget(f"{prefix}out_proj", module, out.weight, out.bias, _projection_observe(module, 3))
    )
    return targets


def _projection_observe(module: nn.Module, index: int) -> Callable[[Observer], RemovableObservation]:
    def observe(observer: Observer) -> RemovableObservation:
        def hook(i: int, x: Tensor, y: Tensor) -> None:
            if i == index:
                observer(x, y)

        return RemovableObservation(add_projection_hook(module, hook))  # type: ignore[arg-type]

    return observe


def _kfac_conv(module: nn.Module) -> bool:
    assert isinstance(module, nn.Conv2d)
    return module.groups == 1 and not isinstance(module.padding, str) and module.padding_mode == "zeros"


def _qat(class_name: str) -> Callable[..., nn.Module]:
    def convert(module: nn.Module, **settings: Any) -> nn.Module:
        from lightning_parallel.quantization import qat_layers

        return getattr(qat_layers, class_name).from_float(module, **settings)  # type: ignore[no-any-return]

    return convert


def _bnb_linear(
    module: nn.Module, *, quant_type: str, threshold: float, compute_dtype: torch.dtype
) -> nn.Module:
    from lightning_parallel.quantization import bnb_layers

    if quant_type == "int8":
        return bnb_layers.FrozenLinear8bit.from_float(module, threshold=threshold)  # type: ignore[arg-type]
    return bnb_layers.FrozenLinearNF4.from_float(module, compute_dtype=compute_dtype)  # type: ignore[arg-type]


BUILTIN_TYPES = (
    LayerType(
        "nn.MultiheadAttention",
        lambda m: isinstance(m, nn.MultiheadAttention),
        _attention_targets,
        to_qat=_qat("QATMultiheadAttention"),
        claims=lambda m: [m.get_submodule("out_proj")],
    ),
    LayerType(
        "transformers Conv1D",
        is_hf_conv1d,
        lambda name, m: [linear_target(name, m, transposed=True)],
        to_qat=_qat("QATConv1D"),
    ),
    LayerType(
        "nn.Linear",
        lambda m: isinstance(m, nn.Linear) and not getattr(type(m), "frozen_weight", False),
        lambda name, m: [linear_target(name, m)],
        to_qat=_qat("QATLinear"),
        to_bnb=_bnb_linear,
    ),
    LayerType(
        "nn.Conv2d",
        lambda m: isinstance(m, nn.Conv2d),
        lambda name, m: [linear_target(name, m)] if _kfac_conv(m) else [],
        to_qat=_qat("QATConv2d"),
    ),
)
for _type in reversed(BUILTIN_TYPES):
    register_layer_type(_type)
