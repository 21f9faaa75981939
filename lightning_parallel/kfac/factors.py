"""Rows of the K-FAC factors of ``nn.Linear`` and ``nn.Conv2d`` layers (pure functions).

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


def supported(module: nn.Module) -> bool:
    """Whether K-FAC handles this layer: ``nn.Linear``, or ``nn.Conv2d`` without groups or string padding.

    Args:
        module: Any module.

    Returns:
        ``True`` for the layers this module can build factors for.
    """
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and not isinstance(module.padding, str) and module.padding_mode == "zeros"
    return isinstance(module, nn.Linear)


def input_rows(module: nn.Module, x: torch.Tensor, bias_column: bool = True) -> torch.Tensor:
    """The rows ``a_r`` of a layer's input, with a ones column when the layer has a bias.

    Args:
        module: An ``nn.Linear`` or ``nn.Conv2d``.
        x: The layer's input: ``(n, ..., in_features)`` for Linear, ``(n, C, H, W)`` for Conv2d.
        bias_column: Whether to append the ones column of a layer with a bias.

    Returns:
        A float32 (or wider) tensor of shape ``(rows, in_dim)``; ``in_dim`` counts the bias column
        when ``bias_column`` is set.
    """
    x = x.detach().to(torch.promote_types(x.dtype, torch.float32))
    if isinstance(module, nn.Conv2d):
        # supported() admits only integer padding, zeros padding mode and groups=1
        patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # type: ignore[arg-type]  # (n, C*kh*kw, L)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (n*L, C*kh*kw)
    else:
        rows = x.reshape(-1, x.shape[-1])  # (n*T, in)
    if bias_column and module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows


def input_gram(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``sum_r a_r a_r^T`` over a layer input's rows, bias entries included, and the number of rows.

    The bias part is formed from column sums (``[[R^T R, R^T 1], [1^T R, rows]]``) instead of
    copying the rows with a ones column.

    Args:
        module: An ``nn.Linear`` or ``nn.Conv2d``.
        x: The layer's input.

    Returns:
        The ``(in_dim, in_dim)`` sum and the row count.
    """
    rows = input_rows(module, x, bias_column=False)
    count = rows.shape[0]
    if module.bias is None:
        return gram(rows), count
    dim = rows.shape[1]
    out = rows.new_empty(dim + 1, dim + 1)
    with torch.autocast(device_type=rows.device.type, enabled=False):
        torch.mm(rows.t(), rows, out=out[:dim, :dim])
        sums = rows.sum(0)
    out[:dim, dim] = sums
    out[dim, :dim] = sums
    out[dim, dim] = count
    return out, count


def output_grad_rows(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """The rows ``g_r`` of the gradient of a layer's output.

    Args:
        module: An ``nn.Linear`` or ``nn.Conv2d``.
        grad: The gradient of the layer's output, shaped like the output.

    Returns:
        A float32 (or wider) tensor of shape ``(rows, out_dim)``.
    """
    grad = grad.detach().to(torch.promote_types(grad.dtype, torch.float32))
    if isinstance(module, nn.Conv2d):
        return grad.flatten(2).transpose(1, 2).reshape(-1, grad.shape[1])  # (n*L, C_out)
    return grad.reshape(-1, grad.shape[-1])


def gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows^T rows`` in float32 with autocast off (a factor's unnormalised sum).

    Args:
        rows: A ``(rows, dim)`` tensor.

    Returns:
        The ``(dim, dim)`` sum of outer products.
    """
    with torch.autocast(device_type=rows.device.type, enabled=False):
        return rows.t() @ rows


def gradient_matrix(module: nn.Module) -> torch.Tensor | None:
    """The layer's weight gradient as ``(out_dim, in_dim)``, bias gradient as the last column.

    Args:
        module: An ``nn.Linear`` or ``nn.Conv2d``.

    Returns:
        The matrix, or ``None`` when the weight has no gradient.
    """
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    if weight.grad is None:
        return None
    mat = weight.grad.reshape(weight.shape[0], -1)
    bias = module.bias
    if isinstance(bias, torch.Tensor):
        bias_grad = bias.grad if bias.grad is not None else torch.zeros_like(bias)
        mat = torch.cat([mat, bias_grad.reshape(-1, 1)], dim=1)
    return mat


def write_gradient_matrix(module: nn.Module, mat: torch.Tensor) -> None:
    """Writes a ``(out_dim, in_dim)`` matrix back into the layer's weight and bias gradients.

    Args:
        module: An ``nn.Linear`` or ``nn.Conv2d``.
        mat: The matrix, bias as the last column when the layer has a bias.
    """
    weight = module.weight
    assert isinstance(weight, torch.Tensor) and weight.grad is not None
    bias = module.bias
    if isinstance(bias, torch.Tensor):
        if bias.grad is not None:
            bias.grad.copy_(mat[:, -1])
        mat = mat[:, :-1]
    grad = weight.grad
    if grad.is_contiguous():  # one strided copy into a view, no temporary
        grad.view(grad.shape[0], -1).copy_(mat)
    else:
        grad.copy_(mat.reshape(grad.shape))


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """``(in_dim, out_dim)``: the sizes of the layer's A and G factors.

    Args:
        module: An ``nn.Linear`` or ``nn.Conv2d``.

    Returns:
        The sizes, ``in_dim`` including the bias column.
    """
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    in_dim = weight[0].numel() + (1 if module.bias is not None else 0)
    return in_dim, weight.shape[0]
