"""Rows of the K-FAC factors of linear-like layers (pure functions).

A layer is read through its :class:`~lightning_parallel.layers.registry.LinearTarget` (``nn.Linear``,
``nn.Conv2d``, Hugging Face ``Conv1D`` with its transposed weight, the projections of
``nn.MultiheadAttention``): a Conv2d target is unfolded into patches, every other one is a linear map.

A layer's weight gradient (bias as an extra column) is a sum over rows: ``dW = sum_r g_r a_r^T``,
with ``a_r`` an input row (a ones entry appended for the bias) and ``g_r`` the matching row of the
gradient of the layer's output. A Linear layer has one row per example (times any sequence
positions); a Conv2d layer one per example and output position (unfolded patches).

K-FAC approximates the layer's Fisher block by ``A kron G`` with, for ``n`` examples,
``A = sum_r a_r a_r^T / rows`` and ``G = n * sum_r g_r g_r^T``. The factor ``n`` puts G on the
per-example scale of the Fisher: the gradient of a batch-mean loss carries ``1/n`` per example,
so ``g_r = (1/n) * d loss_example / d s_r`` and ``(n g_r)(n g_r)^T / n = n g_r g_r^T``. Without it G
is ``n^2`` too small, damping dominates and K-FAC degrades to rescaled SGD. Positions
(sequence or spatial) are treated as shared weights, as in KFC (Grosse & Martens, 2016):
``A kron G = |positions| * mean(a a^T) kron mean((n g)(n g)^T)``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lightning_parallel.layers.registry import LinearTarget, linear_target


def as_target(layer: nn.Module | LinearTarget) -> LinearTarget:
    """``layer`` as a :class:`~lightning_parallel.layers.registry.LinearTarget` (a module gets the target of
    its ``weight`` and ``bias``, as ``nn.Linear``/``nn.Conv2d`` have them)."""
    return layer if isinstance(layer, LinearTarget) else linear_target("", layer)


def input_rows(module: nn.Module | LinearTarget, x: torch.Tensor) -> torch.Tensor:
    """The rows ``a_r`` of a linear layer's input, with a ones column when the layer has a bias.

    (A Conv2d input goes to columns instead: :func:`input_columns`.)

    Args:
        module: A linear layer (or its target).
        x: The layer's input, ``(n, ..., in_features)``.

    Returns:
        A float32 (or wider) tensor of shape ``(rows, in_dim)``; ``in_dim`` counts the bias column.
    """
    x = x.detach().to(torch.promote_types(x.dtype, torch.float32))
    rows = x.reshape(-1, x.shape[-1])  # (n*T, in)
    if as_target(module).bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows


def input_columns(module: nn.Module, x: torch.Tensor, ones_row: bool = False, row_step: int = 1) -> torch.Tensor:
    """A Conv2d input's unfolded patches as columns (one per patch), the rows of ``F.unfold`` transposed.

    The patches are read through a strided view of the padded input and copied once, in the
    layout the gram product wants (``F.unfold`` followed by a transposing copy costs several times
    as much on small inputs).

    Args:
        module: An ``nn.Conv2d`` (integer padding, zeros padding mode, groups=1).
        x: The layer's input, ``(n, C, H, W)``.
        ones_row: Whether to append a row of ones (the bias entries).
        row_step: Keep the patches of every ``row_step``-th output row only (1: all).

    Returns:
        A float32 (or wider) tensor of shape ``(C*kh*kw [+ 1], n*L)``; row ``c*kh*kw + i*kw + j``
        (the order of ``F.unfold`` and of the weight) holds kernel entry ``(c, i, j)`` of every
        patch, the patches in the order ``(OH, n, OW)``.
    """
    assert isinstance(module, nn.Conv2d)
    x = x.detach().to(torch.promote_types(x.dtype, torch.float32))
    kh, kw = module.kernel_size
    sh, sw = module.stride
    dh, dw = module.dilation
    padding = module.padding
    assert not isinstance(padding, str)  # supported() admits only integer padding
    ph, pw = int(padding[0]), int(padding[1])
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    x = x.contiguous()
    n, c, h, w = x.shape
    oh = (h - dh * (kh - 1) - 1) // sh + 1
    ow = (w - dw * (kw - 1) - 1) // sw + 1
    oh = -(-oh // row_step)  # output rows 0, row_step, 2 row_step, ...
    s_n, s_c, s_h, s_w = x.stride()
    # (C, kh, kw, OH, n, OW), a view; the order of the columns does not matter to the gram, and
    # this one copies about twice as fast as (n, OH, OW) on small images
    patches = x.as_strided(
        (c, kh, kw, oh, n, ow), (s_c, dh * s_h, dw * s_w, row_step * sh * s_h, s_n, sw * s_w)
    )
    dim = c * kh * kw
    out = x.new_empty(dim + int(ones_row), oh * n * ow)
    out[:dim].view(c, kh, kw, oh, n, ow).copy_(patches)
    if ones_row:
        out[dim].fill_(1.0)
    return out


def input_gram(
    module: nn.Module | LinearTarget, x: torch.Tensor, position_step: int = 1
) -> tuple[torch.Tensor, int]:
    """``sum_r a_r a_r^T`` over a layer input's rows, bias entries included, and the number of rows.

    One product of the rows augmented with their ones entries: a Conv2d input is unfolded
    straight into columns with a ones row (:func:`input_columns`), a Linear input gets a ones
    column. (Forming the bias block from row sums, without the ones, measured slower: it needs
    three more small writes.)

    Args:
        module: A linear-like layer's target (or an ``nn.Linear``/``nn.Conv2d``).
        x: The layer's input.
        position_step: Use every ``position_step``-th position only (:func:`subsample_positions`;
            a Conv2d: output row).

    Returns:
        The ``(in_dim, in_dim)`` sum over the rows used and their count.
    """
    target = as_target(module)
    if target.conv is not None:
        cols = input_columns(target.conv, x, ones_row=target.bias is not None, row_step=position_step)
        return gram(cols.t()), cols.shape[1]
    rows = input_rows(target, subsample_positions(x, position_step))
    return gram(rows), rows.shape[0]


def subsample_positions(t: torch.Tensor, step: int) -> torch.Tensor:
    """Every ``step``-th position of a Linear input or output gradient: dimension 1 of a tensor with
    more than two dimensions (``(n, T, ..., features)``); a 2-D tensor has one position per example."""
    return t[:, ::step] if step > 1 and t.dim() > 2 else t


def output_grad_gram(module: nn.Module | LinearTarget, grad: torch.Tensor, position_step: int = 1) -> torch.Tensor:
    """``sum_r g_r g_r^T`` over the rows ``g_r`` of the gradient of a layer's output.

    A Conv2d gradient is laid out channel-major, ``(C_out, n*L)``, by one copy that moves whole
    ``L``-blocks, instead of transposing it into rows.

    Args:
        module: A linear-like layer's target (or an ``nn.Linear``/``nn.Conv2d``).
        grad: The gradient of the layer's output, shaped like the output.
        position_step: Use every ``position_step``-th position only (a Conv2d: output row, as
            :func:`input_columns`), the sum rescaled by ``positions / positions used`` to estimate the sum over all.

    Returns:
        The ``(out_dim, out_dim)`` sum.
    """
    grad = grad.detach().to(torch.promote_types(grad.dtype, torch.float32))
    if as_target(module).conv is not None:
        used = grad[:, :, ::position_step] if position_step > 1 else grad
        cols = used.transpose(0, 1).reshape(grad.shape[1], -1)  # (C_out, n*L)
        total = gram(cols.t())
        return total if used is grad else total.mul_(grad.shape[2] / used.shape[2])
    used = subsample_positions(grad, position_step)
    total = gram(used.reshape(-1, used.shape[-1]))  # (n*T, out) rows
    return total if used is grad else total.mul_(grad.shape[1] / used.shape[1])


def gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows^T rows`` in float32 with autocast off (a factor's unnormalised sum).

    Args:
        rows: A ``(rows, dim)`` tensor.

    Returns:
        The ``(dim, dim)`` sum of outer products.
    """
    with torch.autocast(device_type=rows.device.type, enabled=False):
        return rows.t() @ rows


def gradient_matrix(module: nn.Module | LinearTarget) -> torch.Tensor | None:
    """The layer's weight gradient as ``(out_dim, in_dim)``, bias gradient as the last column.

    Args:
        module: A linear-like layer's target (or an ``nn.Linear``/``nn.Conv2d``).

    Returns:
        The matrix, or ``None`` when the weight has no gradient.
    """
    target = as_target(module)
    if target.weight.grad is None:
        return None
    mat = target.matrix(target.weight.grad)
    bias = target.bias
    if isinstance(bias, torch.Tensor):
        bias_grad = target.bias_part(bias.grad if bias.grad is not None else torch.zeros_like(bias))
        mat = torch.cat([mat, bias_grad.reshape(-1, 1)], dim=1)
    return mat


def write_gradient_matrix(module: nn.Module | LinearTarget, mat: torch.Tensor, scale: float = 1.0) -> None:
    """Writes ``scale * mat``, a ``(out_dim, in_dim)`` matrix, into the layer's weight and bias gradients.

    Args:
        module: A linear-like layer's target (or an ``nn.Linear``/``nn.Conv2d``).
        mat: The matrix, bias as the last column when the layer has a bias.
        scale: A factor applied on the way (one pass: the product is written straight into the
            gradients).
    """
    target = as_target(module)
    grad = target.weight.grad
    assert grad is not None
    bias = target.bias
    if isinstance(bias, torch.Tensor):
        if bias.grad is not None:
            _write(target.bias_part(bias.grad), mat[:, -1], scale)
        mat = mat[:, :-1]
    if grad.is_contiguous() or target.transposed:  # straight into a view, no temporary
        _write(target.matrix(grad), mat, scale)
    else:
        _write(grad, mat.reshape(grad.shape), scale)


def _write(dst: torch.Tensor, src: torch.Tensor, scale: float) -> None:
    if scale == 1.0:
        dst.copy_(src)
    else:
        torch.mul(src, scale, out=dst)


def layer_dims(module: nn.Module | LinearTarget) -> tuple[int, int]:
    """``(in_dim, out_dim)``: the sizes of the layer's A and G factors.

    Args:
        module: A linear-like layer's target (or an ``nn.Linear``/``nn.Conv2d``).

    Returns:
        The sizes, ``in_dim`` including the bias column.
    """
    target = as_target(module)
    return target.in_features + (1 if target.bias is not None else 0), target.out_features


def from_triu(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """The symmetric ``(dim, dim)`` matrix whose upper triangle (row-major) is ``packed``."""
    i, j = torch.triu_indices(dim, dim, device=packed.device)
    mat = torch.zeros(dim, dim, dtype=packed.dtype, device=packed.device)
    mat[i, j] = packed
    return mat + mat.triu(1).t()
