"""Saved-tensor hooks: exact passthrough, filters, sharing, accounting, checkpointing."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_parallel.compression import (
    Codec,
    ErrorBoundedCodec,
    KBitCodec,
    PassthroughCodec,
    SavedTensorCompressor,
)


class _Spy(Codec):
    """Passthrough that records what it is asked to encode."""

    name = "spy"

    def __init__(self) -> None:
        self.encoded: list[Tensor] = []
        self.decoded = 0

    def encode(self, x: Tensor, *, error_bound: float | None = None) -> Any:
        self.encoded.append(x)
        return PassthroughCodec().encode(x)

    def decode(self, encoded: Any) -> Tensor:
        self.decoded += 1
        return encoded.tensor


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(8 * 16 * 16, 10),
    )


def _grads(model: nn.Module, x: Tensor, y: Tensor, compressor: SavedTensorCompressor | None) -> Tensor:
    model.zero_grad()
    torch.manual_seed(1)  # same dropout mask
    if compressor is None:
        loss = F.cross_entropy(model(x), y)
    else:
        with compressor:
            loss = F.cross_entropy(model(x), y)
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]


def _data() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)


def test_passthrough_gives_bitwise_identical_gradients() -> None:
    model, (x, y) = _convnet(), _data()
    expected = _grads(model, x, y, None)
    compressor = SavedTensorCompressor(PassthroughCodec(), min_numel=1)
    compressor.exclude(model)
    assert torch.equal(_grads(model, x, y, compressor), expected)
    assert compressor.stats.tensors > 0 and compressor.stats.compression_ratio == 1.0


def test_parameters_never_compressed_and_shared_storages_compressed_once() -> None:
    model, (x, y) = _convnet(), _data()
    spy = _Spy()
    compressor = SavedTensorCompressor(spy, min_numel=1)
    compressor.exclude(model)
    _grads(model, x, y, compressor)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    buffers = {b.untyped_storage().data_ptr() for b in model.buffers()}
    assert all(t.untyped_storage().data_ptr() not in params | buffers for t in spy.encoded)
    ptrs = [(t.untyped_storage().data_ptr(), t.storage_offset(), t.numel()) for t in spy.encoded]
    assert len(ptrs) == len(set(ptrs)), "a storage was compressed twice"
    # conv1 output (read by BN), BN output, ReLU outputs, flattened input of the Linear, ...
    assert len(spy.encoded) >= 5
    # the first ReLU output is saved by the ReLU and by the next conv: one entry, decoded once per backward
    assert spy.decoded == len(spy.encoded)


def test_shared_storage_decoded_once_per_backward_and_again_for_a_retained_graph() -> None:
    model, (x, y) = _convnet(), _data()
    expected = _grads(model, x, y, None)
    spy = _Spy()
    compressor = SavedTensorCompressor(spy, min_numel=1)
    compressor.exclude(model)
    model.zero_grad()
    torch.manual_seed(1)  # the dropout mask of _grads
    with compressor:
        loss = F.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)
    assert spy.decoded == len(spy.encoded)
    first = torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]
    model.zero_grad()
    loss.backward()
    assert spy.decoded == 2 * len(spy.encoded)
    second = torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]
    assert torch.equal(first, second) and torch.equal(first, expected)


def test_autocast_weight_copies_are_not_compressed() -> None:
    lin = nn.Linear(64, 64)
    x = torch.randn(32, 64, requires_grad=True)
    spy = _Spy()
    compressor = SavedTensorCompressor(spy, min_numel=1)
    with compressor, torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(x).relu()
    out.float().sum().backward()
    sizes = [t.numel() for t in spy.encoded]  # the bf16 input copy and the ReLU output, not the weight
    assert sizes == [32 * 64, 32 * 64]


def test_masks_are_one_bit_and_tiny_tensors_kept() -> None:
    x = torch.randn(4096, requires_grad=True)
    compressor = SavedTensorCompressor(KBitCodec(2), min_numel=1024)
    with compressor:
        mask = x > 0
        y = torch.where(mask, x, 0.0) * 2  # where saves the bool mask
        z = (torch.randn(8, requires_grad=True) * 3).sum()
    (y.sum() + z).backward()
    assert torch.equal(x.grad, 2.0 * mask.float())  # type: ignore[arg-type]
    # bool mask stored at 1 bit: 4096 / 8 bytes
    assert compressor.stats.compressed_tensors == 1
    assert compressor.stats.packed_bytes == 512 + compressor.stats.raw_bytes - 4096


def test_unpack_twice_and_retain_graph() -> None:
    model, (x, y) = _convnet(), _data()
    compressor = SavedTensorCompressor(ErrorBoundedCodec(1e-3), min_numel=1)
    compressor.exclude(model)
    with compressor:
        loss = F.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    model.zero_grad()
    loss.backward()
    for a, p in zip(first, model.parameters()):
        assert torch.equal(a, p.grad)


def test_no_grad_and_inference_pack_nothing() -> None:
    model, (x, _) = _convnet(), _data()
    spy = _Spy()
    with SavedTensorCompressor(spy, min_numel=1), torch.no_grad():
        model(x)
    assert spy.encoded == []


def test_activation_checkpointing_and_in_place_ops() -> None:
    model, (x, y) = _convnet(), _data()
    expected = _grads(model, x, y, None)

    class Wrapped(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, t: Tensor) -> Tensor:
            mid = checkpoint(self.inner[:3], t, use_reentrant=False)
            return self.inner[3:](mid)

    wrapped = Wrapped(model)
    compressor = SavedTensorCompressor(KBitCodec(8), min_numel=1)
    compressor.exclude(wrapped)
    got = _grads(wrapped, x, y, compressor)
    cos = F.cosine_similarity(got, expected, dim=0)
    assert cos > 0.999


@pytest.mark.parametrize("codec", [KBitCodec(2), ErrorBoundedCodec(1e-2)])
def test_lossy_codecs_approximate_gradients_and_account_bytes(codec: Codec) -> None:
    model, (x, y) = _convnet(), _data()
    expected = _grads(model, x, y, None)
    compressor = SavedTensorCompressor(codec)
    compressor.exclude(model)
    got = _grads(model, x, y, compressor)
    assert F.cosine_similarity(got, expected, dim=0) > 0.9
    stats = compressor.stats
    assert stats.compression_ratio > 4
    assert stats.peak_saved_bytes >= stats.packed_bytes
    assert stats.live_bytes == 0  # everything freed after backward


def test_freed_and_reallocated_storage_is_not_mistaken_for_a_saved_one() -> None:
    x = torch.randn(1 << 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
    compressor = SavedTensorCompressor(ErrorBoundedCodec(1e-4, mode="absolute"), min_numel=1)
    with compressor:
        h = x * 2
        first = h.data_ptr()
        y1 = h.sin()  # saves h; only its compressed copy survives the next line
        del h
        held = []
        for _ in range(64):  # allocate until the allocator hands the freed memory back (it usually does)
            h = x * 3
            if h.data_ptr() == first:
                break
            held.append(h)
        y2 = h.sin()
    (y1.sum() + y2.sum()).backward()
    expected = 2 * torch.cos(2 * x.detach()) + 3 * torch.cos(3 * x.detach())
    assert torch.allclose(x.grad, expected, atol=1e-3)  # type: ignore[arg-type]
    assert compressor.stats.compressed_tensors >= 2


def test_softmax_outputs_stay_exact() -> None:
    logits = torch.randn(64, 128, generator=torch.Generator().manual_seed(4), requires_grad=True)
    target = torch.randint(0, 128, (64,), generator=torch.Generator().manual_seed(5))
    F.cross_entropy(logits, target).backward()
    expected = logits.grad.clone()  # type: ignore[union-attr]
    logits.grad = None
    compressor = SavedTensorCompressor(KBitCodec(2), min_numel=1024)
    with compressor:
        loss = F.cross_entropy(logits, target) + torch.softmax(logits, 1).sum() * 0
    loss.backward()
    assert torch.equal(logits.grad, expected)  # type: ignore[arg-type]
    assert compressor.stats.compressed_tensors == 0


def test_per_row_statistics_stay_exact_and_the_data_input_is_compressed() -> None:
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 32, 64, generator=gen)  # data: no autograd history, still compressed
    proj = nn.Linear(64, 3 * 64)
    norm = nn.LayerNorm(64)
    spy = _Spy()
    compressor = SavedTensorCompressor(spy, min_numel=1)
    compressor.exclude(proj)
    compressor.exclude(norm)
    with compressor:
        q, k, v = proj(x).view(4, 32, 3, 2, 32).permute(2, 0, 3, 1, 4).unbind(0)  # (batch, heads, T, 32)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        loss = norm(out.transpose(1, 2).reshape(4, 32, 64)).square().mean()
    loss.backward()
    shapes = {tuple(t.shape) for t in spy.encoded}
    assert x.numel() in {t.numel() for t in spy.encoded}
    # compressed: the data, the projection's output (q, k and v are views of it), the attention output
    assert all(t.numel() >= 4 * 32 * 64 for t in spy.encoded), shapes
    # stored as they are: the attention's log-sum-exp (4, 2, 32) and the norm's mean and 1/std (4, 32, 1)
    assert compressor.stats.tensors - compressor.stats.compressed_tensors == 3

