"""SparseLinear against the masked dense computation; the index-based updates against the mask-based ones."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_parallel.sparse import SparseEngine, SparseLinear, random_mask, rigl_update
from lightning_parallel.sparse.sparse_updates import dense_grad_top, kept_entries, random_positions, regrow


def _pair(seed: int = 0, shape: tuple[int, int] = (24, 40), density: float = 0.2) -> tuple[nn.Linear, SparseLinear, torch.Tensor]:
    torch.manual_seed(seed)
    linear = nn.Linear(shape[1], shape[0]).double()
    mask = random_mask(linear.weight.shape, density, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        linear.weight.mul_(mask)
    return linear, SparseLinear.from_linear(linear, mask), mask


def test_forward_input_and_weight_gradients_equal_the_masked_dense_computation() -> None:
    linear, sparse, _ = _pair()
    x = torch.randn(3, 5, 40, dtype=torch.double, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    target = torch.randn(3, 5, 24, dtype=torch.double)
    ((linear(x) - target) ** 2).sum().backward()
    out = sparse(x2)
    ((out - target) ** 2).sum().backward()
    torch.testing.assert_close(out, linear(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(x2.grad, x.grad, rtol=0, atol=1e-6)
    assert linear.weight.grad is not None
    torch.testing.assert_close(sparse.values.grad, linear.weight.grad.flatten()[sparse.indices], rtol=0, atol=1e-6)
    torch.testing.assert_close(sparse.bias.grad, linear.bias.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(sparse.dense_weight(), linear.weight.detach())


def test_float32_within_1e_6_and_only_nonzeros_are_parameters() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(64, 32)
    mask = random_mask(linear.weight.shape, 0.1, torch.Generator().manual_seed(1))
    with torch.no_grad():
        linear.weight.mul_(mask)
    sparse = SparseLinear.from_linear(linear, mask)
    x = torch.randn(8, 64)
    torch.testing.assert_close(sparse(x), linear(x), rtol=0, atol=1e-6)
    sizes = sorted(p.numel() for p in sparse.parameters())
    assert sizes == [32, int(mask.sum())]
    opt = torch.optim.Adam(sparse.parameters())
    sparse(x).sum().backward()
    opt.step()
    assert sorted(s.numel() for st in opt.state.values() for s in st.values() if s.dim()) == [32, 32, 205, 205]


def test_sparse_rigl_update_equals_the_masked_one() -> None:
    linear, sparse, mask = _pair(seed=3)
    x = torch.randn(16, 40, dtype=torch.double)
    target = torch.randn(16, 24, dtype=torch.double)
    ((linear(x) - target) ** 2).mean().backward()
    sparse.record = True
    ((sparse(x) - target) ** 2).mean().backward()
    assert linear.weight.grad is not None
    expected = rigl_update(linear.weight, mask, linear.weight.grad, 0.3)
    kept = kept_entries(sparse.values, 0.3, "rigl")
    count = sparse.values.numel() - kept.numel()
    grown = dense_grad_top(sparse, sparse.indices[kept], count, block_entries=7 * 40)  # several row blocks
    state = torch.arange(sparse.values.numel(), dtype=torch.double) + 1.0
    old_indices = sparse.indices.clone()
    regrow(sparse, kept, grown, [state])
    assert torch.equal(torch.sort(sparse.indices).values, expected.flatten().nonzero().squeeze(1))
    for i, position in enumerate(sparse.indices.tolist()):  # carried value and state, or a fresh zero
        where = (old_indices == position).nonzero()
        if where.numel():
            assert state[i] == where.item() + 1.0
            assert sparse.values[i] == linear.weight.flatten()[position]
        else:
            assert state[i] == 0.0 and sparse.values[i] == 0.0


def test_random_positions_avoid_the_kept_set() -> None:
    exclude = torch.arange(0, 1000, 3)
    got = random_positions(1000, exclude, 400, torch.Generator().manual_seed(0))
    assert got.numel() == 400 and got.unique().numel() == 400
    assert not torch.isin(got, exclude).any()


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_engine_sparse_execution_keeps_nnz_and_trains(method: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    engine = SparseEngine(model, method=method, sparsity=0.7, distribution="uniform", execution="sparse")
    assert all(isinstance(model[i], SparseLinear) for i in (0, 2, 4))
    counts = engine.nnz()
    assert sum(p.numel() for p in model.parameters()) == sum(counts.values()) + 64 + 64 + 4
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 20), torch.randint(0, 4, (64,))
    losses = []
    for step in range(30):
        update = engine.is_update_step(step, update_interval=5, stop_at=25)
        engine.record_dense_gradients(update)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if update:
            before = model[2].indices.clone()
            engine.update(step, stop_at=25, optimizer=opt)
            assert not torch.equal(before, model[2].indices)
        opt.step()
        losses.append(loss.item())
        assert engine.nnz() == counts
        assert all(int(model[i].indices.unique().numel()) == counts[str(i)] for i in (0, 2, 4))
    assert losses[-1] < 0.5 * losses[0]
    assert math.prod(model[2].weight_shape) == 64 * 64


def test_a_foreign_model_transformer_encoder() -> None:
    """torch's own TransformerEncoder: FFN Linears run sparse, out_proj stays masked, MHA's packed input is counted."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    masked = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    sparse = copy.deepcopy(masked)
    engine_m = SparseEngine(masked, method="set", sparsity=0.7, distribution="uniform", seed=4)
    engine_s = SparseEngine(sparse, method="set", sparsity=0.7, distribution="uniform", seed=4, execution="sparse")
    assert engine_m.uncovered == {"MultiheadAttention": 2} == engine_s.uncovered
    assert sorted(engine_s.sparse) == [f"layers.{i}.linear{j}" for i in (0, 1) for j in (1, 2)]
    assert sorted(engine_s.masks) == ["layers.0.self_attn.out_proj", "layers.1.self_attn.out_proj"]
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(sparse(x), masked(x), rtol=0, atol=1e-5)
