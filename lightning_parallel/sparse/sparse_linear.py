"""``SparseLinear``: an ``nn.Linear`` whose weight is stored and multiplied as a CSR matrix.

Why a custom ``autograd.Function`` and not a ``torch.sparse`` parameter: on torch 2.13 ``torch.sparse.mm``
of a COO or CSR leaf and a dense matrix does differentiate (the gradient is a sparse tensor on the leaf's own
pattern), but the optimizers this project uses cannot take it: ``torch.optim.Adam``/``AdamW`` refuse sparse
gradients ("Adam does not support sparse gradients"), SGD with momentum keeps a sparse buffer whose pattern
drifts, and DDP, gradient clipping and DPKFAC expect dense ``.grad``. So the trainable parameter is the dense
1-D vector ``values`` of the nonzeros (the optimizer state has exactly ``nnz`` entries per tensor, with any
optimizer), the pattern lives in integer buffers, and the Function below runs the three products with sparse
kernels:

- forward ``y = x W^T``: ``torch.sparse.mm(W_csr, x^T)^T`` (``O(B nnz)``);
- input gradient ``dx = dy W``: ``torch.sparse.mm(W^T_csr, dy^T)^T`` with the transposed CSR kept as a
  permutation of ``values``;
- memory per nonzero: the value (4 bytes in fp32), its flat index (8, int64: the persistent pattern) and the
  CSR column, transposed column and permutation (4 each, int32 while every size fits): 24 bytes, against 4
  bytes of weight and 1 of mask per *dense* entry in masked mode;
- weight gradient ``dvalues = (dy^T x)`` sampled on the pattern: ``torch.sparse.sampled_addmm`` (no dense
  ``out x in`` matrix is ever formed).

RigL needs the dense gradient at mask-update steps: with ``record = True`` every backward keeps its ``x`` and
``dy`` (appended, so the micro-batches of a pipeline step or accumulated batches together give the step's
gradient) so :func:`dense_grad_top` can find the largest entries of ``dy^T x`` row block by row block.

The pattern is the sorted flat (row-major) index of each nonzero, ``indices``; ``values[i]`` is the weight at
``indices[i]``. Changing the pattern keeps ``values`` the same Parameter (same length: drop-and-grow keeps
nnz), so optimizers keep referring to it; :meth:`set_pattern` returns where each old entry went so optimizer
state can be moved with it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


class _SparseMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, values: torch.Tensor, layer: SparseLinear) -> torch.Tensor:
        weight = _csr(layer.crow, layer.col, values.detach(), (layer.out_features, layer.in_features))
        ctx.save_for_backward(x, values)
        ctx.layer = layer
        return torch.sparse.mm(weight, x.t()).t()  # (B, out)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, values = ctx.saved_tensors
        layer: SparseLinear = ctx.layer
        grad_out = grad_out.contiguous()
        if layer.record:  # every backward of the step (micro-batches): their rows together give its gradient
            previous = layer.recorded
            if previous is None:
                layer.recorded = (x.detach(), grad_out.detach())
            else:
                layer.recorded = (torch.cat([previous[0], x.detach()]), torch.cat([previous[1], grad_out.detach()]))
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            transposed = _csr(
                layer.t_crow, layer.t_col, values.detach()[layer.t_perm], (layer.in_features, layer.out_features)
            )
            grad_x = torch.sparse.mm(transposed, grad_out.t()).t()  # (B, in)
        if ctx.needs_input_grad[1]:
            pattern = _csr(layer.crow, layer.col, values.detach(), (layer.out_features, layer.in_features))
            grad_values = torch.sparse.sampled_addmm(pattern, grad_out.t(), x, beta=0.0).values()
        return grad_x, grad_values, None


class SparseLinear(nn.Module):
    """A linear layer ``y = x W^T + b`` with ``W`` held as its nonzeros and a CSR pattern.

    Args:
        in_features: input width.
        out_features: output width.
        indices: sorted flat row-major positions of the nonzeros, ``(nnz,)`` int64.
        values: the weights at those positions, ``(nnz,)``.
        bias: the bias ``(out_features,)`` or ``None``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        indices: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.values = nn.Parameter(values.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.indices: torch.Tensor
        self.register_buffer("indices", indices.detach().clone().long())
        self.register_buffer("crow", torch.empty(0, dtype=torch.int64), persistent=False)
        self.register_buffer("col", torch.empty(0, dtype=torch.int64), persistent=False)
        self.register_buffer("t_crow", torch.empty(0, dtype=torch.int64), persistent=False)
        self.register_buffer("t_col", torch.empty(0, dtype=torch.int64), persistent=False)
        self.register_buffer("t_perm", torch.empty(0, dtype=torch.int64), persistent=False)
        self.record = False
        self.recorded: tuple[torch.Tensor, torch.Tensor] | None = None
        self._build_structure()

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor) -> SparseLinear:
        """The sparse form of ``linear`` keeping the weights where ``mask`` is ``True``."""
        indices = mask.flatten().nonzero().squeeze(1).to(linear.weight.device)
        return cls(
            linear.in_features,
            linear.out_features,
            indices=indices,
            values=linear.weight.detach().flatten()[indices],
            bias=linear.bias,
        )

    @classmethod
    def random(
        cls, in_features: int, out_features: int, density: float, *, generator: torch.Generator, bias: bool = True
    ) -> SparseLinear:
        """A layer with ``round(density * in * out)`` uniformly placed nonzeros, built without a dense weight.

        The weights are uniform in ``+-1 / sqrt(density * in_features)`` (nn.Linear's bound over the expected
        number of active inputs), the bias uniform in ``+-1 / sqrt(in_features)``; for widths whose dense form
        does not fit in memory.
        """
        from lightning_parallel.sparse.sparse_updates import random_positions

        numel = in_features * out_features
        count = min(numel, max(1, round(density * numel)))
        indices = torch.sort(random_positions(numel, torch.empty(0, dtype=torch.int64), count, generator)).values
        bound = 1.0 / math.sqrt(max(1.0, density * in_features))
        values = (torch.rand(count, generator=generator) * 2 - 1) * bound
        bias_values = (torch.rand(out_features, generator=generator) * 2 - 1) / math.sqrt(in_features) if bias else None
        return cls(in_features, out_features, indices=indices, values=values, bias=bias_values)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def _build_structure(self) -> None:
        rows = torch.div(self.indices, self.in_features, rounding_mode="floor")
        cols = self.indices % self.in_features
        # int32 index structures where they fit (half the bytes per nonzero); torch's CSR kernels take either
        small = max(self.indices.numel(), self.in_features, self.out_features) < 2**31 - 1
        index = torch.int32 if small else torch.int64
        self.crow = torch._convert_indices_from_coo_to_csr(rows, self.out_features, out_int32=small)
        self.col = cols.to(index)
        # the transposed pattern (CSR of W^T) sorted by (col, row): t_perm maps its entries to ``values``
        perm = torch.argsort(cols * self.out_features + rows)
        self.t_crow = torch._convert_indices_from_coo_to_csr(cols[perm], self.in_features, out_int32=small)
        self.t_col = rows[perm].to(index)
        self.t_perm = perm.to(index)

    def set_pattern(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Replace the pattern (same nnz) and the weights; returns ``order`` with ``new = old_like[order]``.

        Args:
            indices: new flat positions (any order, no repeats), as many as now.
            values: the weights at those positions.

        Returns:
            The permutation applied to sort ``indices``, so per-entry state ``s`` aligned with the unsorted
            ``indices`` becomes ``s[order]``.
        """
        if indices.numel() != self.values.numel():
            raise ValueError(
                f"`indices` has {indices.numel()} entries, the layer holds {self.values.numel()}: drop-and-grow "
                "keeps the number of nonzeros."
            )
        order = torch.argsort(indices)
        self.indices = indices[order].to(self.indices.device)
        with torch.no_grad():
            self.values.copy_(values[order])
        self._build_structure()
        return order

    def _resize(self, nnz: int) -> None:
        if nnz != self.indices.numel():
            self.values.data = torch.empty(nnz, dtype=self.values.dtype, device=self.values.device)
            self.indices = torch.empty(nnz, dtype=torch.int64, device=self.indices.device)

    def load_pattern(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Set the pattern and weights from a checkpoint (the number of nonzeros may change)."""
        self._resize(indices.numel())
        self.set_pattern(indices, values)

    def dense_weight(self) -> torch.Tensor:
        """The ``(out, in)`` dense weight with zeros off the pattern."""
        weight = torch.zeros(
            self.out_features * self.in_features, dtype=self.values.dtype, device=self.values.device
        )
        weight[self.indices] = self.values.detach()
        return weight.view(self.weight_shape)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the dense-with-zeros weight."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.to(device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def get_extra_state(self) -> dict[str, int]:
        return {"in_features": self.in_features, "out_features": self.out_features}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.in_features, self.out_features = int(state["in_features"]), int(state["out_features"])

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        weight = state_dict.pop(prefix + "weight", None)
        if weight is not None:
            self.out_features, self.in_features = weight.shape
            state_dict.setdefault(prefix + "_extra_state", self.get_extra_state())  # a dense-with-zeros checkpoint: its nonzeros (the exact pattern, with any
            # zero-valued active weights, comes back from SparseTraining's own state right after)
            flat = weight.flatten()
            state_dict[prefix + "indices"] = flat.nonzero().squeeze(1)
            state_dict[prefix + "values"] = flat[state_dict[prefix + "indices"]]
        if prefix + "indices" in state_dict:
            self._resize(state_dict[prefix + "indices"].numel())
        bias = state_dict.get(prefix + "bias")
        if self.bias is not None and bias is not None and bias.shape != self.bias.shape:  # neuron-pruned
            self.bias.data = torch.empty_like(bias, device=self.bias.device, dtype=self.bias.dtype)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._build_structure()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        out = _SparseMatmul.apply(flat, self.values, self)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        density = self.values.numel() / max(1, math.prod(self.weight_shape))
        return f"in_features={self.in_features}, out_features={self.out_features}, density={density:.4g}"
