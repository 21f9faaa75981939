"""The pure rules: densities against their formulas, RigL/SET against brute-force references, constant nnz."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_parallel.sparse import (
    SparseEngine,
    drop_fraction_at,
    erk_densities,
    random_mask,
    rigl_update,
    set_update,
    uniform_densities,
)

SHAPES = {"conv": (16, 3, 3, 3), "fc1": (256, 64), "fc2": (128, 256), "out": (10, 128)}


def test_erk_densities_match_the_formula() -> None:
    density = 0.2
    got = erk_densities(SHAPES, density)
    raw = {n: sum(s) / math.prod(s) for n, s in SHAPES.items()}
    total = sum(math.prod(s) for s in SHAPES.values())
    dense = {n for n, d in got.items() if d == 1.0}
    budget = density * total - sum(math.prod(SHAPES[n]) for n in dense)
    eps = budget / sum(raw[n] * math.prod(SHAPES[n]) for n in SHAPES if n not in dense)
    for name in SHAPES:
        expected = 1.0 if name in dense else eps * raw[name]
        assert got[name] == pytest.approx(expected, rel=1e-12)
    assert sum(got[n] * math.prod(s) for n, s in SHAPES.items()) == pytest.approx(density * total, rel=1e-12)
    # a layer is made dense only because its scaled raw density exceeded 1
    assert dense and all(eps * raw[n] <= 1.0 + 1e-12 for n in SHAPES if n not in dense)


def test_er_ignores_kernel_dimensions_and_uniform_is_flat() -> None:
    er = erk_densities(SHAPES, 0.5, kernel=False)
    assert er["fc1"] / er["fc2"] == pytest.approx(((256 + 64) / (256 * 64)) / ((128 + 256) / (128 * 256)))
    assert set(uniform_densities(SHAPES, 0.3).values()) == {0.3}
    with pytest.raises(ValueError, match=r"`density=1.5` must be in \(0, 1\]"):
        uniform_densities(SHAPES, 1.5)


def test_random_mask_has_the_exact_count() -> None:
    gen = torch.Generator().manual_seed(0)
    mask = random_mask((50, 40), 0.1, gen)
    assert mask.dtype == torch.bool and int(mask.sum()) == 200


def test_cosine_drop_fraction() -> None:
    assert drop_fraction_at(0, initial=0.3, stop_at=100) == pytest.approx(0.3)
    assert drop_fraction_at(50, initial=0.3, stop_at=100) == pytest.approx(0.15)
    assert drop_fraction_at(100, initial=0.3, stop_at=100) == 0.0
    assert drop_fraction_at(10, initial=0.3, stop_at=100, decay="constant") == 0.3


def test_rigl_regrows_exactly_the_top_gradient_zero_positions() -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(30, 20, generator=gen)
    mask = random_mask(weight.shape, 0.25, gen)
    weight *= mask
    grad = torch.randn(30, 20, generator=gen)
    new = rigl_update(weight, mask, grad, 0.3)
    active = int(mask.sum())
    count = round(0.3 * active)
    # brute force: sort the active magnitudes, keep the largest; sort |grad| over the rest, take the largest
    flat_w, flat_m, flat_g = weight.flatten(), mask.flatten(), grad.flatten()
    active_idx = [i for i in range(flat_w.numel()) if flat_m[i]]
    kept = set(sorted(active_idx, key=lambda i: -abs(float(flat_w[i])))[: active - count])
    rest = [i for i in range(flat_w.numel()) if i not in kept]
    grown = set(sorted(rest, key=lambda i: -abs(float(flat_g[i])))[:count])
    assert set(new.flatten().nonzero().squeeze(1).tolist()) == kept | grown
    assert int(new.sum()) == active


def test_set_drops_per_sign_and_keeps_the_count() -> None:
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(40, 30, generator=gen)
    mask = random_mask(weight.shape, 0.2, gen)
    new = set_update(weight, mask, 0.3, torch.Generator().manual_seed(3))
    assert int(new.sum()) == int(mask.sum())
    w = weight.flatten()
    pos = [i for i in mask.flatten().nonzero().squeeze(1).tolist() if w[i] >= 0]
    neg = [i for i in mask.flatten().nonzero().squeeze(1).tolist() if w[i] < 0]
    kept_pos = set(sorted(pos, key=lambda i: -float(w[i]))[: len(pos) - round(0.3 * len(pos))])
    kept_neg = set(sorted(neg, key=lambda i: float(w[i]))[: len(neg) - round(0.3 * len(neg))])
    assert kept_pos | kept_neg <= set(new.flatten().nonzero().squeeze(1).tolist())


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 32), nn.ReLU(),
                         nn.Linear(32, 10))


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
@pytest.mark.parametrize("method", ["rigl", "set"])
def test_masked_steps_equal_a_dense_reference_with_the_mask_applied_by_hand(optimizer_name: str, method: str) -> None:
    model = _model()
    reference = _model()
    engine = SparseEngine(model, method=method, sparsity=0.8, distribution="erk", seed=0)
    make = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
        "adam": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.01),
    }[optimizer_name]
    opt, ref_opt = make(model.parameters()), make(reference.parameters())
    names = dict(reference.named_modules())
    masks = {n: m.clone() for n, m in engine.masks.items()}
    initial = {n: m.clone() for n, m in engine.masks.items()}
    with torch.no_grad():
        for name, mask in masks.items():
            names[name].weight.mul_(mask)
    counts = engine.nnz()
    gen = torch.Generator().manual_seed(5)
    for step in range(12):
        x, y = torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
        if engine.is_update_step(step, update_interval=4, stop_at=10):
            engine.update(step, stop_at=10, optimizer=opt)
            for name, new in engine.masks.items():  # the reference: the same new mask, applied by hand
                keep = new & masks[name]
                weight = names[name].weight
                with torch.no_grad():
                    weight.mul_(keep)
                for state in ref_opt.state[weight].values():
                    if isinstance(state, torch.Tensor) and state.shape == weight.shape:
                        state.mul_(keep)
                masks[name] = new.clone()
        engine.mask_gradients()
        for name, mask in masks.items():
            names[name].weight.grad.mul_(mask)
        opt.step()
        ref_opt.step()
        engine.apply_masks()
        with torch.no_grad():
            for name, mask in masks.items():
                names[name].weight.mul_(mask)
        assert engine.nnz() == counts
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(engine.masks[n], initial[n]) for n in engine.masks)  # the masks did move


def test_engine_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"`sparsity=1.0` must be in \[0, 1\)"):
        SparseEngine(_model(), sparsity=1.0)
    with pytest.raises(ValueError, match=r"`method='magnitude'` is not one of \['rigl', 'set', 'static'\]"):
        SparseEngine(_model(), method="magnitude")
    with pytest.raises(ValueError, match=r"`distribution='er'` is not one of"):
        SparseEngine(_model(), distribution="er")
    with pytest.raises(ValueError, match=r"`drop_fraction=1.5` must be in \[0, 1\]"):
        SparseEngine(_model(), drop_fraction=1.5)
    with pytest.raises(ValueError, match=r"has no nn.Linear or nn.Conv2d layer"):
        SparseEngine(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match=r"`execution='sparse'` runs plain nn.Linear layers only"):
        SparseEngine(nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3)), execution="sparse", sparsity=0.5)
