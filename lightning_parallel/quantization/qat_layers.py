"""Layers with fake-quantized weights and inputs for quantization-aware training.

Each QAT layer shares the ``weight`` and ``bias`` parameters of the float layer it replaces, so the model's
``state_dict`` keeps the float model's keys; what differs between the layer types is only how the weight is
applied, so the quantizers and the input path live once in :class:`_FakeQuantized`.

Design decisions:

- Weights are quantized per output channel (or group-wise along the flattened input) in the ``(out, in)``
  layout: Hugging Face ``Conv1D`` stores its weight ``(in, out)``, so :class:`QATConv1D` quantizes its
  transpose, which makes it the same layer as a :class:`QATLinear` holding the transposed weight.
- :class:`QATMultiheadAttention` quantizes ``in_proj_weight`` per row (the rows of the query, key and value
  blocks, as three QAT Linear layers would), ``out_proj.weight``, and the input of each of the four
  projections, by running :func:`~lightning_parallel.layers.attention.attention_forward` (torch's own
  forward applies the weights inside ``F.multi_head_attention_forward`` or a fused kernel, out of reach).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_parallel.layers.attention import attention_forward, projection_weights
from lightning_parallel.quantization.activation_quantizer import ActivationFakeQuantizer
from lightning_parallel.quantization.weight_quantizer import WeightFakeQuantizer


class _FakeQuantized(nn.Module):
    """The quantizers of a QAT layer: one for the ``(C_out, ...)`` weight, one (optional) for the input."""

    weight_quantizer: WeightFakeQuantizer
    input_quantizer: ActivationFakeQuantizer | None
    converted = True  # the layer registry does not convert it again

    def _attach_quantizers(
        self,
        source: nn.Module,
        weight: Tensor,
        weight_bits: int,
        act_bits: int | None,
        group_size: int | None,
    ) -> None:
        """Share ``source``'s parameters and create the quantizers; ``weight`` is in ``(C_out, ...)`` layout."""
        for name in ("weight", "bias"):
            setattr(self, name, getattr(source, name))
        self.train(source.training)
        self.weight_quantizer = WeightFakeQuantizer(weight, weight_bits, group_size)
        self.input_quantizer = ActivationFakeQuantizer(act_bits) if act_bits is not None else None

    def _quantize_input(self, input: Tensor) -> Tensor:
        return input if self.input_quantizer is None else self.input_quantizer(input)


class QATLinear(nn.Linear, _FakeQuantized):
    """A Linear layer that trains a float weight but computes with its fake-quantized version.

    Args:
        in_features: input width.
        out_features: output width.
        bias: whether the layer has a bias.
    """

    @classmethod
    def from_float(
        cls, linear: nn.Linear, *, weight_bits: int, act_bits: int | None, group_size: int | None
    ) -> QATLinear:
        """Wrap ``linear`` (sharing its parameters) with fake quantizers.

        Args:
            linear: the float layer.
            weight_bits: weight bit width, 2 to 8.
            act_bits: input bit width, 2 to 8, or ``None`` to leave inputs in float.
            group_size: group size for group-wise weights, or ``None`` for per-output-channel.
        """
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer._attach_quantizers(linear, linear.weight, weight_bits, act_bits, group_size)
        return layer.to(linear.weight.device)

    @override
    def forward(self, input: Tensor) -> Tensor:
        return nn.functional.linear(
            self._quantize_input(input), self.weight_quantizer(self.weight), self.bias
        )


class QATConv2d(nn.Conv2d, _FakeQuantized):
    """A Conv2d layer that trains a float weight but computes with its fake-quantized version.

    Weights are quantized per output channel (or group-wise along ``in_channels * kh * kw``).
    """

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, *, weight_bits: int, act_bits: int | None, group_size: int | None
    ) -> QATConv2d:
        """Wrap ``conv`` (sharing its parameters) with fake quantizers.

        Args:
            conv: the float layer.
            weight_bits: weight bit width, 2 to 8.
            act_bits: input bit width, 2 to 8, or ``None`` to leave inputs in float.
            group_size: group size for group-wise weights, or ``None`` for per-output-channel.
        """
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
        )
        layer._attach_quantizers(conv, conv.weight, weight_bits, act_bits, group_size)
        return layer.to(conv.weight.device)

    @override
    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(self._quantize_input(input), self.weight_quantizer(self.weight), self.bias)


class QATConv1D(_FakeQuantized):
    """Hugging Face ``transformers.pytorch_utils.Conv1D`` (``y = x @ W + b``, ``W`` stored ``(in, out)``) with
    fake-quantized weight and input. Built by :meth:`from_float`; it keeps the original ``weight`` and
    ``bias`` parameters and the ``nf``/``nx`` attributes.
    """

    transposed_linear = True  # the layer registry reads it as a linear layer with a transposed weight

    @classmethod
    def from_float(
        cls, conv1d: nn.Module, *, weight_bits: int, act_bits: int | None, group_size: int | None
    ) -> QATConv1D:
        """Wrap ``conv1d`` (sharing its parameters) with fake quantizers.

        Args:
            conv1d: the Hugging Face ``Conv1D`` layer.
            weight_bits: weight bit width, 2 to 8.
            act_bits: input bit width, 2 to 8, or ``None`` to leave inputs in float.
            group_size: group size for group-wise weights, or ``None`` for per-output-channel.
        """
        layer = cls()
        weight: Any = conv1d.weight
        layer.nx, layer.nf = weight.shape
        layer._attach_quantizers(conv1d, weight.t(), weight_bits, act_bits, group_size)
        return layer

    @override
    def forward(self, input: Tensor) -> Tensor:
        weight: Any = self.weight
        w = self.weight_quantizer(weight.t())  # (out, in)
        return nn.functional.linear(self._quantize_input(input), w, self.bias)  # type: ignore[arg-type]

    @override
    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}"


class QATMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with fake-quantized projection weights and projection inputs.

    Built by :meth:`from_float`, sharing the original parameters and ``out_proj`` module (the ``state_dict``
    keeps its keys). Quantizers: ``in_proj_quantizers`` (one for ``in_proj_weight``, or three for separate
    ``q/k/v_proj_weight``), ``out_proj_quantizer``, and ``input_quantizers`` (query, key, value and output
    projection inputs; ``None`` for weight-only QAT).
    """

    converted = True
    projection_forward = True  # the layer registry's projection hooks need no forward swap

    in_proj_quantizers: nn.ModuleList
    out_proj_quantizer: WeightFakeQuantizer
    input_quantizers: nn.ModuleList | None

    @classmethod
    def from_float(
        cls, attn: nn.MultiheadAttention, *, weight_bits: int, act_bits: int | None, group_size: int | None
    ) -> QATMultiheadAttention:
        """Wrap ``attn`` (sharing its parameters) with fake quantizers.

        Args:
            attn: the float attention.
            weight_bits: weight bit width, 2 to 8.
            act_bits: input bit width, 2 to 8, or ``None`` to leave inputs in float.
            group_size: group size for group-wise weights, or ``None`` for per-output-channel.
        """
        layer = cls(
            attn.embed_dim,
            attn.num_heads,
            dropout=attn.dropout,
            bias=attn.in_proj_bias is not None,
            add_bias_kv=attn.bias_k is not None,
            add_zero_attn=attn.add_zero_attn,
            kdim=attn.kdim,
            vdim=attn.vdim,
            batch_first=attn.batch_first,
            device="meta",
        )
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
            setattr(layer, name, getattr(attn, name))
        for name in ("in_proj_bias", "bias_k", "bias_v"):
            setattr(layer, name, getattr(attn, name))
        layer.out_proj = attn.out_proj
        layer.train(attn.training)
        if attn._qkv_same_embed_dim:
            weights = [attn.in_proj_weight]
        else:
            weights = [attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight]
        layer.in_proj_quantizers = nn.ModuleList(
            WeightFakeQuantizer(w, weight_bits, group_size) for w in weights
        )
        layer.out_proj_quantizer = WeightFakeQuantizer(attn.out_proj.weight, weight_bits, group_size)
        layer.input_quantizers = (
            None if act_bits is None else nn.ModuleList(ActivationFakeQuantizer(act_bits) for _ in range(4))
        )
        return layer.to(attn.out_proj.weight.device)

    @override
    def forward(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor | None]:  # type: ignore[override]
        """As ``nn.MultiheadAttention.forward`` (same arguments), with the quantized weights and inputs."""
        _, _, _, b_q, b_k, b_v, _, b_o = projection_weights(self)
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_quantizers[0](self.in_proj_weight).chunk(3)
        else:
            raw = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
            w_q, w_k, w_v = (q(w) for q, w in zip(self.in_proj_quantizers, raw))
        w_o = self.out_proj_quantizer(self.out_proj.weight)
        weights = (w_q, w_k, w_v, b_q, b_k, b_v, w_o, b_o)
        return attention_forward(self, *args, weights=weights, project=self._project, **kwargs)

    def _project(self, index: int, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.input_quantizers is not None:
            x = self.input_quantizers[index](x)
        return torch.nn.functional.linear(x, weight, bias)
