"""The local losses of the AuxNet engine against a hand-written penalty / augmented-Lagrangian objective."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_parallel.auxnet import AuxNetOptions, AuxNetRuntime, RhoSchedule
from lightning_parallel.pipeline.micro_batches import split_micro_batches as split_batch

RHO = 0.7
STAGES = 3


class TinyMLP(nn.Module):
    """Three stages of Linear + tanh (the last a Linear to 3 classes) on (B, 5) inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Linear(5, 6), nn.Tanh()),
            nn.Sequential(nn.Linear(6, 4), nn.Tanh()),
            nn.Linear(4, 3),
        )
        self.aux = nn.ModuleList([nn.Linear(5, 6), nn.Linear(5, 4)])  # a_1, a_2

    def pipeline_blocks(self) -> nn.Sequential:
        return self.blocks

    def pipeline_input(self, batch: Any) -> torch.Tensor:
        return batch[0]

    def pipeline_loss(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        return F.cross_entropy(output, batch[1])


def batch(seed: int = 1, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(size, 5, generator=gen), torch.randint(0, 3, (size,), generator=gen)


def reference_objective(
    model: TinyMLP, data: tuple[torch.Tensor, torch.Tensor], rho: float, multipliers: dict[int, torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """J = CE(f_2(z_2), y) + sum_b mean(lambda_b (z_b - f_{b-1}(z_{b-1}))) + rho/2 mean((z_b - f_{b-1}(z_{b-1}))^2)."""
    x, y = data
    z = [x, model.aux[0](x), model.aux[1](x)]
    u = [model.blocks[s](z[s]) for s in range(STAGES)]
    objective = F.cross_entropy(u[2], y)
    residuals = []
    for b in (1, 2):
        r = z[b] - u[b - 1]
        residuals.append(r.detach().mean(0))
        objective = objective + 0.5 * rho * (r**2).sum() / r.numel()
        if b in multipliers:
            objective = objective + (multipliers[b] * r).sum() / r.numel()
    return objective, residuals


def runtime_for(model: TinyMLP, options: AuxNetOptions) -> AuxNetRuntime:
    return AuxNetRuntime(
        list(model.blocks), list(model.aux), model.pipeline_input, model.pipeline_loss, options
    )


def engine_gradients(model: TinyMLP, runtime: AuxNetRuntime, data: Any, micro: int) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    runtime.train_step(split_batch(data, micro))
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


@pytest.mark.parametrize("micro", [1, 4])
def test_penalty_gradients_equal_the_objective(micro: int) -> None:
    model = TinyMLP()
    runtime = runtime_for(model, AuxNetOptions(loss="penalty", rho=RHO, aux_update_interval=0))
    data = batch()
    got = engine_gradients(model, runtime, data, micro)
    objective, _ = reference_objective(model, data, RHO, {})
    expected = torch.autograd.grad(objective, list(model.parameters()))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in got)  # every stage and auxiliary network gets a gradient


def test_local_loss_values_equal_the_objective_terms() -> None:
    model = TinyMLP()
    runtime = runtime_for(model, AuxNetOptions(loss="penalty", rho=RHO, aux_update_interval=0))
    data = batch()
    stats = runtime.train_step(split_batch(data, 2))
    with torch.no_grad():
        x, y = data
        z = [x, model.aux[0](x), model.aux[1](x)]
        u = [model.blocks[s](z[s]) for s in range(STAGES)]
    torch.testing.assert_close(stats[2]["loss"], F.cross_entropy(u[2], y))
    for b in (1, 2):
        torch.testing.assert_close(stats[b]["penalty"], 0.5 * RHO * ((z[b] - u[b - 1]) ** 2).mean())
        torch.testing.assert_close(stats[b]["residual"], ((z[b] - u[b - 1]) ** 2).mean())


def test_augmented_lagrangian_gradients_and_multiplier_step() -> None:
    model = TinyMLP()
    options = AuxNetOptions(loss="augmented_lagrangian", rho=RHO, aux_update_interval=0)
    runtime = runtime_for(model, options)
    gen = torch.Generator().manual_seed(5)
    multipliers = {1: torch.randn(6, generator=gen), 2: torch.randn(4, generator=gen)}
    runtime.load_state_dict({"step": 0, "multipliers": multipliers})
    data = batch()
    got = engine_gradients(model, runtime, data, 4)
    objective, residuals = reference_objective(model, data, RHO, multipliers)
    expected = torch.autograd.grad(objective, list(model.parameters()))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    for b in (1, 2):  # lambda <- lambda + rho * mean over the examples of the residual
        torch.testing.assert_close(runtime.multipliers[b], multipliers[b] + RHO * residuals[b - 1])
    penalty_only, _ = reference_objective(model, data, RHO, {})
    assert not torch.allclose(expected[0], torch.autograd.grad(penalty_only, [model.blocks[0][0].weight])[0])


def test_multipliers_start_at_zero_and_the_penalty_is_the_al_without_them() -> None:
    data = batch()
    grads = {}
    for loss in ("penalty", "augmented_lagrangian"):
        model = TinyMLP()
        runtime = runtime_for(model, AuxNetOptions(loss=loss, rho=RHO, aux_update_interval=0))
        grads[loss] = engine_gradients(model, runtime, data, 2)
        assert bool(runtime.multipliers) == (loss == "augmented_lagrangian")
    for a, b in zip(grads["penalty"], grads["augmented_lagrangian"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_oracle_inputs_are_the_end_to_end_activations_and_the_penalty_vanishes() -> None:
    model = TinyMLP()
    runtime = runtime_for(model, AuxNetOptions(loss="penalty", rho=RHO, oracle=True))
    data = batch()
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: [], 2: []}
    hooks = [
        model.blocks[s].register_forward_pre_hook(lambda _, args, s=s: seen[s].append(args[0].detach()))
        for s in range(STAGES)
    ]
    got = engine_gradients(model, runtime, data, 2)
    for hook in hooks:
        hook.remove()
    stats = runtime.train_step(split_batch(data, 2))
    x, y = data
    with torch.no_grad():
        h = [x, model.blocks[0](x)]
        h.append(model.blocks[1](h[1]))
    for s in range(STAGES):
        torch.testing.assert_close(torch.cat(seen[s]), h[s], rtol=0, atol=0)
    for b in (1, 2):
        assert float(stats[b]["penalty"]) == 0.0 and float(stats[b]["residual"]) == 0.0
    # only the true loss is left: the last stage gets the end-to-end gradient, the earlier stages none
    model.zero_grad()
    F.cross_entropy(model.blocks(x), y).backward()
    torch.testing.assert_close(got[4], model.blocks[2].weight.grad)
    assert all(float(g.abs().sum()) == 0.0 for g in got[:4])
    assert all(p.grad is None for p in model.aux.parameters())


def test_refit_moves_the_auxiliary_networks_towards_the_true_inputs_only() -> None:
    model = TinyMLP()
    runtime = runtime_for(
        model, AuxNetOptions(loss="penalty", aux_update_interval=1, aux_steps=30, aux_lr=0.05)
    )
    data = batch()
    marker = [torch.full_like(p, 7.0) for p in model.aux.parameters()]
    for p, m in zip(model.aux.parameters(), marker):
        p.grad = m.clone()
    trunk = [p.detach().clone() for p in model.blocks.parameters()]
    before = runtime.refit(split_batch(data, 2))
    after = runtime.refit(split_batch(data, 2))
    assert all(after[s] < 0.5 * before[s] for s in (1, 2))
    for p, m in zip(model.aux.parameters(), marker):  # the step's own gradients are left alone
        torch.testing.assert_close(p.grad, m)
    assert all(torch.equal(a, b) for a, b in zip(trunk, model.blocks.parameters()))


def test_rho_schedule() -> None:
    schedule = RhoSchedule(0.5, growth=2.0, maximum=3.0)
    assert [schedule.value(t) for t in range(4)] == [0.5, 1.0, 2.0, 3.0]
    assert RhoSchedule(0.5).value(10**6) == 0.5
    assert RhoSchedule(1.0, growth=2.0).value(10**6) < math.inf  # no overflow


def test_without_the_stage_input_gradient_the_stages_see_constant_inputs() -> None:
    """stage_input_gradient=False: the gradient of J with every stage run on sg(z_s) (the auxiliary networks
    learn only from the constraint at their stage's input)."""
    model = TinyMLP()
    options = AuxNetOptions(loss="penalty", rho=RHO, aux_update_interval=0, stage_input_gradient=False)
    data = batch()
    got = engine_gradients(model, runtime_for(model, options), data, 2)
    x, y = data
    z = [x, model.aux[0](x), model.aux[1](x)]
    u = [model.blocks[s](z[s].detach()) for s in range(STAGES)]
    objective = F.cross_entropy(u[2], y) + sum(0.5 * RHO * (z[b] - u[b - 1]).square().mean() for b in (1, 2))
    expected = torch.autograd.grad(objective, list(model.parameters()))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    full = engine_gradients(model, runtime_for(model, AuxNetOptions(loss="penalty", rho=RHO, aux_update_interval=0)),
                            data, 2)
    aux_grads = len(list(model.blocks.parameters()))
    assert any(not torch.allclose(a, b) for a, b in zip(got[aux_grads:], full[aux_grads:]))  # it differs


def test_true_input_loss_adds_the_last_stages_loss_on_its_true_input_at_refits() -> None:
    data = batch()
    grads = {}
    for flag in (False, True):
        model = TinyMLP()
        options = AuxNetOptions(loss="penalty", rho=RHO, aux_update_interval=2, true_input_loss=flag)
        runtime = runtime_for(model, options)
        grads[flag] = engine_gradients(model, runtime, data, 2)  # step 0: a refit
        if flag:
            x, y = data
            with torch.no_grad():
                h = model.blocks[1](model.blocks[0](x))
            extra = torch.autograd.grad(F.cross_entropy(model.blocks[2](h), y), list(model.blocks[2].parameters()))
            second = engine_gradients(model, runtime, data, 2)  # step 1: no refit, no extra term
    last = len(list(model.blocks[:2].parameters()))
    count = len(list(model.blocks[2].parameters()))
    for index, (off, on) in enumerate(zip(grads[False], grads[True], strict=True)):
        if last <= index < last + count:
            torch.testing.assert_close(on - off, extra[index - last], rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(on, off, rtol=0, atol=0)
    reference = TinyMLP()
    plain = runtime_for(reference, AuxNetOptions(loss="penalty", rho=RHO, aux_update_interval=2))
    engine_gradients(reference, plain, data, 2)
    for p, q in zip(reference.parameters(), model.parameters()):  # same weights: the test only ran gradients
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for g, e in zip(second, engine_gradients(reference, plain, data, 2), strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
