"""Fake quantization: forward values, LSQ gradients against the formula, grouping and packing."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_parallel.quantization import (
    ActivationFakeQuantizer,
    WeightFakeQuantizer,
    dequantize,
    fake_quantize,
    lsq_grad_scale,
    quant_range,
    quantize,
)
from lightning_parallel.quantization.fake_quantize import from_groups, to_groups
from lightning_parallel.quantization.packing import pack_codes, unpack_codes


def test_quant_range() -> None:
    assert quant_range(8) == (-128, 127)
    assert quant_range(4) == (-8, 7)
    assert quant_range(8, signed=False) == (0, 255)
    assert quant_range(2) == (-2, 1)


@pytest.mark.parametrize("bits", [1, 9, 16, "8", 4.0])
def test_quant_range_rejects_bad_bits(bits: object) -> None:
    with pytest.raises(ValueError, match=r"bits=.* is not supported; use an integer from 2 to 8"):
        quant_range(bits)  # type: ignore[arg-type]


def test_forward_known_values() -> None:
    x = torch.tensor([-1.3, -0.2, 0.26, 0.5, 2.0, -3.0])
    scale = torch.tensor(0.25)
    # 4-bit signed grid [-8, 7]: x / s = [-5.2, -0.8, 1.04, 2, 8, -12] -> [-5, -1, 1, 2, 7, -8]
    expected = torch.tensor([-1.25, -0.25, 0.25, 0.5, 1.75, -2.0])
    out = fake_quantize(x, scale, -8, 7)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, dequantize(quantize(x, scale, -8, 7), scale))
    assert quantize(x, scale, -8, 7).tolist() == [-5, -1, 1, 2, 7, -8]


def test_forward_per_channel_scale() -> None:
    x = torch.tensor([[0.3, -0.7], [3.0, -5.0]])
    scale = torch.tensor([[0.1], [1.0]])
    expected = torch.tensor([[0.3, -0.7], [3.0, -5.0]])
    torch.testing.assert_close(fake_quantize(x, scale, -128, 127), expected)
    clipped = fake_quantize(x, scale, -4, 3)  # row 1: [3, -5] -> [3, -4]
    torch.testing.assert_close(clipped, torch.tensor([[0.3, -0.4], [3.0, -4.0]]))


def _lsq_reference(x: torch.Tensor, s: float, qmin: int, qmax: int, g: float, up: torch.Tensor) -> tuple:
    """Element by element, from LSQ's equations (Esser et al. 2020, eq. 3 and 5)."""
    grad_x = torch.zeros_like(x)
    grad_s = 0.0
    for i, xi in enumerate(x.tolist()):
        v = xi / s
        if v <= qmin:
            d_s = qmin
        elif v >= qmax:
            d_s = qmax
        else:
            d_s = round(v) - v
            grad_x[i] = up[i]
        grad_s += float(up[i]) * d_s
    return grad_x, grad_s * g


def test_lsq_step_size_gradient_matches_formula() -> None:
    torch.manual_seed(0)
    x = (torch.randn(50) * 2).requires_grad_()
    scale = torch.tensor(0.3, requires_grad=True)
    qmin, qmax = quant_range(4)
    g = lsq_grad_scale(x.numel(), qmax)
    assert g == pytest.approx(1 / math.sqrt(50 * 7))
    upstream = torch.randn(50)
    fake_quantize(x, scale, qmin, qmax, g).backward(upstream)
    ref_x, ref_s = _lsq_reference(x.detach(), 0.3, qmin, qmax, g, upstream)
    assert ((x.detach() / 0.3 < qmin) | (x.detach() / 0.3 > qmax)).any(), "the test must exercise clipping"
    torch.testing.assert_close(x.grad, ref_x)
    assert float(scale.grad) == pytest.approx(ref_s, rel=1e-5)


def test_lsq_matches_detach_formulation_per_channel() -> None:
    """The hand-written backward equals the usual ``grad_scale`` / ``round_pass`` autograd formulation."""
    torch.manual_seed(1)
    w = torch.randn(6, 10)
    s = (torch.rand(6, 1) * 0.2 + 0.05).requires_grad_()
    g = lsq_grad_scale(10, 127)
    up = torch.randn(6, 10)

    w1 = w.clone().requires_grad_()
    fake_quantize(w1, s, -128, 127, g).backward(up)
    grads = (w1.grad.clone(), s.grad.clone())
    s.grad = None

    w2 = w.clone().requires_grad_()
    s_scaled = (s - s * g).detach() + s * g
    v = torch.clamp(w2 / s_scaled, -128, 127)
    v = (v.round() - v).detach() + v
    (v * s_scaled).backward(up)
    torch.testing.assert_close(grads[0], w2.grad)
    torch.testing.assert_close(grads[1], s.grad)


def test_groups_roundtrip_with_padding() -> None:
    w = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 3, 5)  # K = 15
    grouped = to_groups(w, 4)
    assert grouped.shape == (2, 4, 4)
    assert grouped[:, -1, -1].abs().sum() == 0  # padding is zero
    torch.testing.assert_close(from_groups(grouped, w.shape), w)


def test_weight_quantizer_per_channel() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3)
    q = WeightFakeQuantizer(w, bits=8)
    scale = q.scale()
    assert scale.shape == (4, 1, 1, 1)
    torch.testing.assert_close(scale.flatten(), w.reshape(4, -1).abs().amax(1) / 127)
    out = q(w)
    codes = out / scale
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
    assert (out - w).abs().max() <= scale.max() / 2 + 1e-6  # nothing clipped at the start
    int_codes, int_scale = q.integer_weight(w)
    assert int_codes.dtype == torch.int8 and int_codes.shape == (4, 27)
    torch.testing.assert_close((int_codes.float() * int_scale).reshape(w.shape), out)
    assert q.grad_scale == pytest.approx(1 / math.sqrt(27 * 127))


def test_weight_quantizer_group_wise() -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 20)
    q = WeightFakeQuantizer(w, bits=4, group_size=8)  # groups [0:8], [8:16], [16:20] + padding
    assert q.scale().shape == (3, 3, 1)
    torch.testing.assert_close(q.scale()[:, 2, 0], w[:, 16:].abs().amax(1) / 7)
    out = q(w)
    for gi, (lo, hi) in enumerate([(0, 8), (8, 16), (16, 20)]):
        s = q.scale()[:, gi]  # (3, 1)
        torch.testing.assert_close(out[:, lo:hi], torch.clamp(torch.round(w[:, lo:hi] / s), -8, 7) * s)
    codes, scale = q.integer_weight(w)
    assert codes.shape == (3, 20) and scale.shape == (3, 3)
    assert codes.min() >= -8 and codes.max() <= 7
    assert q.grad_scale == pytest.approx(1 / math.sqrt(8 * 7))


def test_weight_factor_gradient_is_chain_rule_of_lsq() -> None:
    torch.manual_seed(0)
    w = torch.randn(5, 7)
    q = WeightFakeQuantizer(w, bits=4)
    with torch.no_grad():
        q.factor.mul_(0.6)  # make some weights clip
    up = torch.randn(5, 7)
    q(w).backward(up)
    s = (q.init_scale * 0.6).clone().requires_grad_()
    fake_quantize(w, s, -8, 7, lsq_grad_scale(7, 7)).backward(up)
    torch.testing.assert_close(q.factor.grad, q.init_scale * s.grad)


def test_weight_quantizer_rejects_bad_group_size() -> None:
    with pytest.raises(ValueError, match=r"group_size=0 must be a positive integer"):
        WeightFakeQuantizer(torch.randn(2, 4), bits=4, group_size=0)


def test_activation_quantizer_unsigned_and_signed_start() -> None:
    relu_out = torch.rand(4, 16) * 3
    q = ActivationFakeQuantizer(8)
    out = q(relu_out)
    assert q.qrange() == (0, 255)
    expected_scale = relu_out.max() / 255  # finer than LSQ's 2 mean / sqrt(255) here
    assert expected_scale < 2 * relu_out.mean() / math.sqrt(255)
    torch.testing.assert_close(q.scale(), expected_scale)
    torch.testing.assert_close(
        out, torch.clamp(torch.round(relu_out / expected_scale), 0, 255) * expected_scale
    )

    x = torch.randn(4, 16)
    q2 = ActivationFakeQuantizer(8)
    q2(x)
    assert q2.qrange() == (-128, 127)
    torch.testing.assert_close(q2.scale(), x.abs().max() / 127)
    # the start is fixed once: a new batch does not move it
    q2(x * 100)
    torch.testing.assert_close(q2.scale(), x.abs().max() / 127)

    # at 2 bits LSQ's start is the finer one
    q3 = ActivationFakeQuantizer(2)
    q3(x)
    torch.testing.assert_close(q3.scale(), 2 * x.abs().mean() / math.sqrt(1))
    assert q3.scale() < x.abs().max()


def test_activation_quantizer_starts_from_the_first_training_batch() -> None:
    q = ActivationFakeQuantizer(8).eval()
    small = torch.rand(4, 16) * 0.01  # e.g. what BatchNorm with its initial running statistics gives
    assert torch.equal(q(small), small)  # evaluation before training: no grid yet, input unchanged
    assert not bool(q.initialized)
    train_batch = torch.rand(4, 16) * 3
    q.train()
    q(train_batch)
    torch.testing.assert_close(q.scale(), train_batch.max() / 255)
    q.eval()
    out = q(small)  # once started, evaluation quantizes with the training grid
    torch.testing.assert_close(out, torch.clamp(torch.round(small / q.scale()), 0, 255) * q.scale())


def test_activation_gradient_scale_uses_features_per_example() -> None:
    x = torch.randn(4, 3, 5)
    q = ActivationFakeQuantizer(8)
    q(x).sum().backward()
    s = q.scale().detach().clone().requires_grad_()
    fake_quantize(x, s, -128, 127, lsq_grad_scale(15, 127)).sum().backward()
    torch.testing.assert_close(q.factor.grad, q.init_scale * s.grad)


def test_quantizer_state_is_outside_module_state_dict() -> None:
    q = ActivationFakeQuantizer(8)
    q(torch.rand(2, 3))
    assert q.state_dict() == {}
    state = q.quantizer_state()
    assert set(state) == {"factor", "init_scale", "initialized", "signed"}
    fresh = ActivationFakeQuantizer(8)
    fresh.load_quantizer_state(state)
    assert fresh.qrange() == (0, 255)
    torch.testing.assert_close(fresh.scale(), q.scale())
    with pytest.raises(ValueError, match=r"quantizer state has keys"):
        fresh.load_quantizer_state({"factor": torch.ones(())})


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 8), rows=st.integers(1, 4), k=st.integers(1, 17), seed=st.integers(0, 1000))
def test_pack_unpack_roundtrip(bits: int, rows: int, k: int, seed: int) -> None:
    qmin, qmax = quant_range(bits)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(qmin, qmax + 1, (rows, k), generator=g, dtype=torch.int8)
    packed = pack_codes(codes, bits)
    if bits <= 4:
        assert packed.dtype == torch.uint8 and packed.shape == (rows, (k + 1) // 2)
    else:
        assert packed.dtype == torch.int8 and packed.shape == (rows, k)
    assert torch.equal(unpack_codes(packed, bits, k), codes)


def test_bfloat16_input_is_quantized_in_float32() -> None:
    torch.manual_seed(0)
    xb = torch.randn(4096).bfloat16().requires_grad_()
    up = torch.randn(4096)
    s16 = torch.tensor(0.05, dtype=torch.bfloat16, requires_grad=True)
    out = fake_quantize(xb, s16, -128, 127, 0.01)
    out.backward(up.bfloat16())
    assert out.dtype == torch.bfloat16 and s16.grad.dtype == torch.bfloat16
    # reference: the same (bfloat16-valued) inputs in float32
    x32 = xb.detach().float().requires_grad_()
    s32 = s16.detach().float().requires_grad_()
    ref = fake_quantize(x32, s32, -128, 127, 0.01)
    ref.backward(up.bfloat16().float())
    torch.testing.assert_close(out.float(), ref, atol=0, rtol=2**-8)
    torch.testing.assert_close(xb.grad.float(), x32.grad)
    assert float(s16.grad) == pytest.approx(float(s32.grad), rel=2**-7)
