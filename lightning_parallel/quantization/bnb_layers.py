"""Frozen bitsandbytes Linear layers whose ``state_dict`` holds float weights. Imports bitsandbytes.

Import this module only through :func:`lightning_parallel.quantization.convert_to_bnb`, which checks that
bitsandbytes is installed first.
"""

from __future__ import annotations

import warnings
from typing import Any

import bitsandbytes as bnb
import torch
from torch import Tensor, nn
from typing_extensions import override

_WARNED_NF4 = False


def _load_float_weight(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> Tensor | None:
    """Load everything but ``weight`` the plain ``nn.Module`` way; return the float weight to requantize."""
    key = prefix + "weight"
    weight = state_dict.get(key)
    rest = {k: v for k, v in state_dict.items() if k != key}
    nn.Module._load_from_state_dict(
        module, rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    )
    if weight is None:
        return None
    missing_keys.remove(key)
    expected = (module.out_features, module.in_features)  # type: ignore[union-attr]
    if not weight.is_floating_point() or tuple(weight.shape) != expected:
        error_msgs.append(
            f"{key}: expected a float weight of shape {expected} (the format these layers save), "
            f"got {weight.dtype} {tuple(weight.shape)}."
        )
        return None
    return weight


class FrozenLinear8bit(bnb.nn.Linear8bitLt):
    """``bnb.nn.Linear8bitLt`` with a frozen int8 weight and a trainable float bias."""

    converted = True
    frozen_weight = True  # nothing for K-FAC to precondition

    @classmethod
    def from_float(cls, linear: nn.Linear, *, threshold: float = 0.0) -> FrozenLinear8bit:
        """Quantize ``linear``'s weight; its bias parameter is reused.

        Args:
            linear: the float layer.
            threshold: LLM.int8 outlier threshold (0 disables outlier handling).
        """
        layer = cls(
            linear.in_features, linear.out_features, bias=False, has_fp16_weights=False, threshold=threshold
        )
        layer.set_float_weight(linear.weight.detach(), linear.weight.device)
        layer.bias = linear.bias
        return layer

    def set_float_weight(self, weight: Tensor, device: torch.device) -> None:
        """Quantize ``weight`` row-wise to int8 and store it on ``device``."""
        param: Any = bnb.nn.Int8Params(
            weight.detach().to("cpu", torch.float32).contiguous(), requires_grad=False, has_fp16_weights=False
        )
        self.weight = param.to(device)
        threshold = float(self.state.threshold)
        self.state = bnb.MatmulLtState()
        self.state.threshold = threshold
        self.state.has_fp16_weights = False
        self.state.use_pool = threshold > 0

    def float_weight(self) -> Tensor:
        """The dequantized float32 weight."""
        weight: Any = self.weight
        scb: Any = weight.SCB if getattr(weight, "SCB", None) is not None else self.state.SCB
        return weight.data.float() * (scb.float().unsqueeze(1) / 127.0)

    @override
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.float_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    @override
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        weight = _load_float_weight(self, state_dict, prefix, *args)
        if weight is not None:
            self.set_float_weight(weight, self.weight.device)


class FrozenLinearNF4(bnb.nn.Linear4bit):
    """``bnb.nn.Linear4bit`` (NF4) with a frozen 4-bit weight and a trainable float bias."""

    converted = True
    frozen_weight = True

    @classmethod
    def from_float(cls, linear: nn.Linear, *, compute_dtype: torch.dtype = torch.float32) -> FrozenLinearNF4:
        """Quantize ``linear``'s weight to NF4; its bias parameter is reused.

        Args:
            linear: the float layer.
            compute_dtype: dtype of the matrix multiplication.
        """
        layer = cls(
            linear.in_features, linear.out_features, bias=False, compute_dtype=compute_dtype, quant_type="nf4"
        )
        layer.set_float_weight(linear.weight.detach(), linear.weight.device)
        layer.bias = linear.bias
        return layer

    def set_float_weight(self, weight: Tensor, device: torch.device) -> None:
        """Quantize ``weight`` block-wise to NF4 and store it on ``device``."""
        param: Any = bnb.nn.Params4bit(
            weight.detach().to("cpu", torch.float32).contiguous(),
            requires_grad=False,
            quant_type="nf4",
            module=self,
        )
        self.weight = param.to(device)

    def float_weight(self) -> Tensor:
        """The dequantized float32 weight."""
        weight: Any = self.weight
        w = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        return w.float().reshape(self.out_features, self.in_features)

    @override
    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            return super().forward(x)  # type: ignore[no-any-return]
        try:
            return super().forward(x)  # type: ignore[no-any-return]
        except (RuntimeError, AssertionError) as err:
            # bitsandbytes' CPU inference path (taken in eval mode) fails on shapes its training path handles
            # (0.50: a reshape error, or an assertion that out_features divide its block); that path is the
            # dequantized weight times the input, computed here.
            global _WARNED_NF4
            if not _WARNED_NF4:
                _WARNED_NF4 = True
                warnings.warn(
                    f"bitsandbytes' NF4 CPU kernel failed ({err}); FrozenLinearNF4 multiplies by the dequantized "
                    "weight instead (the result of its training path) from now on.",
                    stacklevel=2,
                )
            return torch.nn.functional.linear(x, self.float_weight().to(x.dtype), self.bias)

    @override
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.float_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    @override
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        weight = _load_float_weight(self, state_dict, prefix, *args)
        if weight is not None:
            self.set_float_weight(weight, self.weight.device)
