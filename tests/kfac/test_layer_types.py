"""K-FAC on Hugging Face Conv1D, on nn.MultiheadAttention's projections and on a user-registered layer type,
each against the same model written with plain nn.Linear layers (whose K-FAC is checked densely elsewhere)."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_parallel.kfac import KFACOptions, KFACPreconditioner
from lightning_parallel.layers import registry
from lightning_parallel.layers.registry import LayerType, linear_target, register_layer_type
from tests.helpers.attention import ExplicitAttention


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> KFACPreconditioner:
    kfac = KFACPreconditioner(model, KFACOptions(damping=0.01, kl_clip=None))
    F.mse_loss(model(x), y, reduction="sum").div(x.shape[0]).backward()
    kfac.step()
    return kfac


def test_hf_conv1d_factors_and_update_equal_those_of_the_transposed_linear() -> None:
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(6, 5).double()  # nf=6 outputs, nx=5 inputs, weight (5, 6)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    linear = nn.Linear(5, 6).double()
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    head = nn.Linear(6, 2).double()
    x, y = torch.randn(8, 3, 5, dtype=torch.float64), torch.randn(8, 3, 2, dtype=torch.float64)
    got = _step(nn.Sequential(conv, nn.Tanh(), head), x, y)
    ref = _step(nn.Sequential(linear, nn.Tanh(), copy.deepcopy(head)), x, y)
    assert [layer.name for layer in got.layers] == ["0", "2"]
    torch.testing.assert_close(got.layers[0].a_factor, ref.layers[0].a_factor)
    torch.testing.assert_close(got.layers[0].g_factor, ref.layers[0].g_factor)
    torch.testing.assert_close(conv.weight.grad.t(), linear.weight.grad)
    torch.testing.assert_close(conv.bias.grad, linear.bias.grad)


class _Attention(nn.Module):
    def __init__(self, attn: nn.Module, cross: bool) -> None:
        super().__init__()
        self.attn, self.cross = attn, cross
        self.head = nn.Linear(8, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memory = x.flip(1) if self.cross else x
        if isinstance(self.attn, nn.MultiheadAttention):
            out = self.attn(x, memory, memory, need_weights=False)[0]
        else:
            out = self.attn(x, memory)
        return self.head(torch.tanh(out))


@pytest.mark.parametrize("cross", [False, True])
def test_multihead_attention_preconditioning_equals_explicit_projections(cross: bool) -> None:
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=True).double()
    ref_model = _Attention(ExplicitAttention(attn), cross)
    model = _Attention(attn, cross)
    ref_model.head.load_state_dict(model.head.state_dict())
    x, y = torch.randn(6, 5, 8, dtype=torch.float64), torch.randn(6, 5, 2, dtype=torch.float64)
    got = _step(model, x, y)
    ref = _step(ref_model, x, y)
    names = ["attn.in_proj.q", "attn.in_proj.k", "attn.in_proj.v", "attn.out_proj", "head"]
    assert [layer.name for layer in got.layers] == names
    for mine, theirs in zip(got.layers, ref.layers):
        torch.testing.assert_close(mine.a_factor, theirs.a_factor)
        torch.testing.assert_close(mine.g_factor, theirs.g_factor)
    e = 8
    for i, proj in enumerate((ref_model.attn.q, ref_model.attn.k, ref_model.attn.v)):
        torch.testing.assert_close(attn.in_proj_weight.grad[i * e : (i + 1) * e], proj.weight.grad)
        torch.testing.assert_close(attn.in_proj_bias.grad[i * e : (i + 1) * e], proj.bias.grad)
    torch.testing.assert_close(attn.out_proj.weight.grad, ref_model.attn.o.weight.grad)
    assert "forward" in attn.__dict__  # recording: the attention runs attention_forward
    got.remove_hooks()  # then it gets torch's own forward (and fast path) back
    assert "forward" not in attn.__dict__


class _Scaled(nn.Module):
    """A user's layer: ``y = x W^T + b`` with a learned ``(out, in)`` weight, applied through F.linear."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in, dtype=torch.float64))
        self.bias = nn.Parameter(torch.zeros(n_out, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@pytest.fixture
def restore_registry() -> Iterator[None]:
    saved = registry.layer_types()
    yield
    registry._REGISTRY[:] = saved


@pytest.mark.usefixtures("restore_registry")
def test_a_registered_layer_type_is_preconditioned_like_linear() -> None:
    torch.manual_seed(0)
    mine = _Scaled(4, 3)
    linear = nn.Linear(4, 3).double()
    linear.load_state_dict(mine.state_dict())
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"no nn\.Linear or nn\.Conv2d layer"):
        KFACPreconditioner(mine)
    register_layer_type(
        LayerType("Scaled", lambda m: isinstance(m, _Scaled), lambda name, m: [linear_target(name, m)])
    )
    _step(mine, x, y)
    _step(linear, x, y)
    torch.testing.assert_close(mine.weight.grad, linear.weight.grad)
    with pytest.raises(TypeError, match=r"layer_type='Scaled' is not a LayerType"):
        register_layer_type("Scaled")  # type: ignore[arg-type]
