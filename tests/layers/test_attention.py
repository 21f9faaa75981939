"""attention_forward computes nn.MultiheadAttention's own forward, and projection hooks come and go."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lightning_parallel.layers.attention import add_projection_hook, attention_forward

CASES = [
    (batch_first, need_weights, inputs, extra, extra, mask, padding)
    for batch_first, inputs in itertools.product([True, False], ["self", "kv", "cross", "kdim"])
    for need_weights, extra in [
        (True, False),
        (False, False),
        (False, True),
    ]  # extra: add_bias_kv, add_zero_attn
    for mask, padding in [(None, False), ("bool", True), ("float", False), ("float", True)]
]


@pytest.mark.parametrize(
    ("batch_first", "need_weights", "inputs", "bias_kv", "zero_attn", "mask", "padding"), CASES
)
def test_matches_the_modules_own_forward(
    batch_first: bool,
    need_weights: bool,
    inputs: str,
    bias_kv: bool,
    zero_attn: bool,
    mask: str | None,
    padding: bool,
) -> None:
    torch.manual_seed(0)
    kdim = 6 if inputs == "kdim" else None
    attn = nn.MultiheadAttention(
        8, 2, batch_first=batch_first, add_bias_kv=bias_kv, add_zero_attn=zero_attn, kdim=kdim, vdim=kdim
    )
    b, t, s = 3, 4, 5

    def make(length: int, width: int) -> torch.Tensor:
        return torch.randn(b, length, width) if batch_first else torch.randn(length, b, width)

    query = make(t, 8)
    if inputs == "self":
        key = value = query
    elif inputs == "kv":
        key = value = make(s, 8)
    else:
        key, value = make(s, kdim or 8), make(s, kdim or 8)
    src = key.shape[1 if batch_first else 0]
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.rand(t, src) > 0.7
        attn_mask[:, 0] = False
    elif mask == "float":
        attn_mask = torch.randn(t, src)
    key_padding_mask = None
    if padding:
        key_padding_mask = torch.rand(b, src) > 0.7
        key_padding_mask[:, 0] = False
        if mask == "float":
            key_padding_mask = key_padding_mask.float() * -1e4
    kwargs = {"key_padding_mask": key_padding_mask, "need_weights": need_weights, "attn_mask": attn_mask}
    expected = attn(query, key, value, **kwargs)
    got = attention_forward(attn, query, key, value, **kwargs)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    if need_weights:
        torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)
    else:
        assert got[1] is None


@pytest.mark.parametrize("need_weights", [True, False])
def test_causal_unbatched_and_dropout(need_weights: bool) -> None:
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    kwargs = {"attn_mask": causal, "is_causal": True, "need_weights": need_weights}
    torch.testing.assert_close(attention_forward(attn, x, x, x, **kwargs)[0], attn(x, x, x, **kwargs)[0])
    single = x[0]  # unbatched (L, E)
    torch.testing.assert_close(
        attention_forward(attn, single, single, single)[0], attn(single, single, single)[0]
    )
    dropping = nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True).train()
    torch.manual_seed(3)
    expected = dropping(x, x, x, need_weights=need_weights)[0]
    torch.manual_seed(3)
    torch.testing.assert_close(attention_forward(dropping, x, x, x, need_weights=need_weights)[0], expected)


def test_projection_hooks_see_every_projection_and_go_away() -> None:
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2)  # sequence-first
    x = torch.randn(5, 3, 8)  # (T, B, E)
    seen: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []
    handle = add_projection_hook(
        attn, lambda i, inp, out: seen.append((i, tuple(inp.shape), tuple(out.shape)))
    )
    assert "forward" in attn.__dict__
    expected = nn.MultiheadAttention.forward(attn, x, x, x)[0]
    torch.testing.assert_close(attn(x, x, x)[0], expected)
    # inputs are handed over batch-first, so that their first dimension counts the examples
    assert seen == [
        (0, (3, 5, 8), (5, 3, 8)),
        (1, (3, 5, 8), (5, 3, 8)),
        (2, (3, 5, 8), (5, 3, 8)),
        (3, (3, 5, 8), (15, 8)),
    ]
    handle.remove()
    assert "forward" not in attn.__dict__
    seen.clear()
    attn(x, x, x)
    assert seen == []
