"""Quantizer state outside the module ``state_dict`` (see :mod:`~lightning_parallel.quantization.quantizer_base`)."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_parallel.quantization.quantizer_base import QuantizerBase


def quantizer_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """All quantizer tensors of ``module``, keyed ``"<quantizer name>.<tensor name>"``.

    Args:
        module: a model converted by :func:`~lightning_parallel.quantization.convert_to_qat`.
    """
    state: dict[str, Tensor] = {}
    for name, sub in module.named_modules():
        if isinstance(sub, QuantizerBase):
            state.update({f"{name}.{key}": t for key, t in sub.quantizer_state().items()})
    return state


def load_quantizer_state_dict(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Load the output of :func:`quantizer_state_dict` into a model converted the same way.

    Args:
        module: the converted model.
        state: the saved quantizer tensors.
    """
    quantizers = {name: sub for name, sub in module.named_modules() if isinstance(sub, QuantizerBase)}
    by_quantizer: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        name, _, leaf = key.rpartition(".")
        by_quantizer.setdefault(name, {})[leaf] = tensor
    if set(by_quantizer) != set(quantizers):
        missing = sorted(set(quantizers) - set(by_quantizer))[:4]
        unexpected = sorted(set(by_quantizer) - set(quantizers))[:4]
        raise ValueError(
            f"quantizer state does not fit the model: missing {missing}, unexpected {unexpected}; convert the "
            "model with the same mode, ignore_modules and module_bits as when it was saved."
        )
    for name, sub in quantizers.items():
        sub.load_quantizer_state(by_quantizer[name])
