"""The factor sums of Conv2d layers against ``F.unfold`` patches, over strides, dilations, paddings and layouts."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_parallel.kfac.factors import input_columns, input_gram, output_grad_gram, write_gradient_matrix

CONVS = [
    # in, out, kernel, stride, padding, dilation, bias, input (H, W)
    (1, 4, 3, 1, 1, 1, True, (8, 8)),
    (3, 5, 3, 2, 1, 1, True, (8, 8)),
    (2, 3, (3, 2), (2, 1), (1, 0), (2, 1), True, (11, 9)),
    (4, 2, 5, 3, 2, 2, False, (13, 12)),
    (2, 2, 1, 1, 0, 1, True, (5, 5)),
]


@pytest.mark.parametrize("spec", CONVS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_factor_sums_match_unfold(spec: tuple, channels_last: bool) -> None:
    cin, cout, kernel, stride, padding, dilation, bias, size = spec
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=bias).double()
    x = torch.randn(3, cin, *size, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out = conv(x)
    patches = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (n, K, L)
    rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    cols = input_columns(conv, x)
    assert cols.shape == (patches.shape[1], rows.shape[0])
    # the same patches, columns in (OH, n, OW) order
    oh, ow = out.shape[2:]
    expected = patches.reshape(3, -1, oh, ow).permute(1, 2, 0, 3).reshape(patches.shape[1], -1)
    assert torch.equal(cols, expected)
    if bias:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    a_sum, count = input_gram(conv, x)
    assert count == rows.shape[0]
    torch.testing.assert_close(a_sum, rows.t() @ rows)
    grad = torch.randn_like(out)
    g_rows = grad.flatten(2).transpose(1, 2).reshape(-1, cout)
    torch.testing.assert_close(output_grad_gram(conv, grad), g_rows.t() @ g_rows)


def test_write_gradient_matrix_scales_into_weight_and_bias() -> None:
    conv = nn.Conv2d(2, 3, 3)
    conv.weight.grad = torch.zeros_like(conv.weight)
    conv.bias.grad = torch.zeros_like(conv.bias)
    mat = torch.randn(3, 2 * 9 + 1)
    write_gradient_matrix(conv, mat, 0.5)
    torch.testing.assert_close(conv.weight.grad, 0.5 * mat[:, :-1].reshape(conv.weight.shape))
    torch.testing.assert_close(conv.bias.grad, 0.5 * mat[:, -1])
