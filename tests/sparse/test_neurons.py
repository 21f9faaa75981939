"""Neuron importance pruning: importance by formula, shrunk layers compute what the masked full model computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_parallel.sparse import SparseEngine, SparseLinear
from lightning_parallel.sparse.export import (
    densify_state_dict,
    export_dense,
    export_sparse,
    resize_to_state_dict,
)
from lightning_parallel.sparse.neurons import linear_pairs, neuron_importance, neurons_to_keep


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(12, 32), nn.ReLU()),
        nn.Sequential(nn.Linear(32, 24), nn.Dropout(0.0), nn.Tanh()),
        nn.Sequential(nn.Linear(24, 5)),
    )


def test_pairs_follow_the_data_flow() -> None:
    assert linear_pairs(_mlp()) == [("0.1", "1.0"), ("1.0", "2.0")]
    assert linear_pairs(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4))) == []


def test_importance_is_the_summed_absolute_incoming_and_outgoing_weights() -> None:
    model = _mlp()
    a, b = model[0][1], model[1][0]
    expected = a.weight.abs().sum(1) + b.weight.abs().sum(0)
    torch.testing.assert_close(neuron_importance(a, b), expected)
    mask = torch.rand(a.weight.shape) < 0.3
    with torch.no_grad():
        a.weight.mul_(mask)
    sparse_a = SparseLinear.from_linear(a, mask)
    torch.testing.assert_close(neuron_importance(sparse_a, b), a.weight.abs().sum(1) + b.weight.abs().sum(0))
    keep = neurons_to_keep(expected, 0.25)
    assert keep.numel() == 24
    assert set(keep.tolist()) == set(torch.argsort(expected, descending=True)[:24].tolist())


@pytest.mark.parametrize("execution", ["masked", "sparse"])
def test_shrunk_model_computes_the_full_model_with_pruned_neurons_zeroed(execution: str) -> None:
    model = _mlp()
    engine = SparseEngine(model, method="set", sparsity=0.5, distribution="uniform", execution=execution)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(20, 12)
    model(x).sum().backward()
    engine.mask_gradients()
    opt.step()
    engine.apply_masks()
    full = export_dense(model)
    a, b, c = full[0][1], full[1][0], full[2][0]
    keep_1 = neurons_to_keep(neuron_importance(a, b), 0.25)
    # reference: zero the pruned neurons' incoming rows and biases of the full dense model, in pair order
    dropped_1 = torch.ones(32, dtype=torch.bool)
    dropped_1[keep_1] = False
    with torch.no_grad():
        a.weight[dropped_1] = 0
        a.bias[dropped_1] = 0
        b.weight[:, dropped_1] = 0
    keep_2 = neurons_to_keep(neuron_importance(b, c), 0.25)
    dropped_2 = torch.ones(24, dtype=torch.bool)
    dropped_2[keep_2] = False
    with torch.no_grad():
        b.weight[dropped_2] = 0
        b.bias[dropped_2] = 0
        c.weight[:, dropped_2] = 0
    nnz_before = sum(engine.nnz().values())
    removed = engine.prune_neurons(0.25, optimizer=opt)
    assert removed == {"0.1": 8, "1.0": 6}
    assert (model[0][1].out_features, model[1][0].in_features, model[1][0].out_features, model[2][0].in_features) == (
        24, 24, 18, 18)
    torch.testing.assert_close(model(x), full(x), rtol=0, atol=1e-5)
    assert sum(engine.nnz().values()) < nnz_before
    # the optimizer keeps working on the same (shrunk) parameters, state cut with them
    opt.zero_grad()
    model(x).sum().backward()
    engine.mask_gradients()
    opt.step()
    for p in model.parameters():
        assert opt.state[p]["exp_avg"].shape == p.shape
    # a plain module of the original width loads the shrunk checkpoint after resizing
    dense_state = densify_state_dict(model.state_dict())
    plain = _mlp()
    assert resize_to_state_dict(plain, dense_state) == ["0.1", "1.0", "2.0"]
    plain.load_state_dict(dense_state)
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=1e-5)
    sparse_copy = export_sparse(plain, max_density=0.6)
    assert isinstance(sparse_copy[1][0], SparseLinear)
    torch.testing.assert_close(sparse_copy(x), model(x), rtol=0, atol=1e-5)
