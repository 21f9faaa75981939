"""The AuxNet runtime over processes (gloo) equals single-process mode; traffic per step; auxiliary networks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lightning_parallel.auxnet import AuxNetOptions, AuxNetRuntime, build_aux_nets, default_aux_net
from lightning_parallel.auxnet.aux_nets import split_trunk_with_aux_nets
from tests.auxnet.auxnet_helpers import STAGES, distributed_worker, held_state, train
from tests.helpers.distributed import run_distributed
from tests.interlocking.helpers import image_batches, tiny_model

OPTIONS = AuxNetOptions(
    loss="augmented_lagrangian", rho=0.5, rho_growth=1.5, aux_update_interval=2, aux_steps=2, true_input_loss=True
)


@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_distributed_equals_single_process(world_size: int) -> None:
    results = run_distributed(distributed_worker, world_size, OPTIONS, timeout=150)
    torch.set_num_threads(1)  # as in the workers: same kernels, so the same rounding
    single, _ = train(OPTIONS)
    expected = held_state(single)
    seen = set()
    for rank, (state, _) in enumerate(results):
        for name, value in state.items():
            torch.testing.assert_close(
                torch.from_numpy(value), expected[name], rtol=0, atol=0, msg=f"rank {rank} {name}"
            )
            seen.add(name)
    assert seen == set(expected)
    assert {"lambda1", "lambda2", "lambda3"} <= seen
    # the traffic per step is the formula of the runtime's docstring: B * n * 4 bytes each way per boundary
    # between two ranks, and once more forward on a refit step (steps 0 and 2)
    batch = image_batches()[0]
    shapes = [h.shape for h in _stage_inputs(batch)]
    per_rank = STAGES // world_size
    for rank, (_, sent) in enumerate(results):
        first, last = rank * per_rank, (rank + 1) * per_rank - 1
        back = shapes[first - 1].numel() * 4 if first > 0 else 0
        forward = shapes[last].numel() * 4 if last < STAGES - 1 else 0
        assert sent == [back + 2 * forward, back + forward, back + 2 * forward], f"rank {rank}"


def _stage_inputs(batch: Any) -> list[torch.Tensor]:
    model = tiny_model()
    stage_blocks, _ = split_trunk_with_aux_nets(model, STAGES, batch)
    h, inputs = batch[0], []
    with torch.no_grad():
        for block in stage_blocks[:-1]:
            h = block(h)
            inputs.append(h)
    return inputs


def test_single_process_sends_nothing_and_trains_every_stage() -> None:
    runtime, sent = train(OPTIONS)
    assert sent == [0, 0, 0]
    torch.manual_seed(0)
    fresh = tiny_model()
    moved = [
        (p - q).abs().max().item()
        for p, q in zip(fresh.parameters(), nn.ModuleList(runtime.stage_blocks).parameters())
    ]
    assert min(moved) > 0


def test_default_aux_nets_fit_the_stage_inputs() -> None:
    images = torch.randn(3, 1, 8, 8)
    for shape in [(3, 4, 8, 8), (3, 8, 4, 4), (3, 16, 2, 2), (3, 5, 3, 3), (3, 7)]:
        net = default_aux_net(1, images, torch.zeros(shape))
        assert net(images).shape == shape, shape
    assert default_aux_net(1, torch.randn(3, 12), torch.zeros(3, 6))(torch.randn(3, 12)).shape == (3, 6)
    with pytest.raises(ValueError, match=r"No default auxiliary network for stage 2: .*pipeline_aux_net"):
        default_aux_net(2, torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, 5, 8))


class _OwnAux(nn.Module):
    def __init__(self, result: Any) -> None:
        super().__init__()
        self.result = result

    def pipeline_aux_net(
        self, stage_index: int, sample_input: torch.Tensor, sample_stage_input: torch.Tensor
    ) -> Any:
        return self.result(stage_index, sample_stage_input)


def test_the_modules_own_aux_nets_and_their_errors() -> None:
    x, z = torch.randn(2, 3), [torch.zeros(2, 4), torch.zeros(2, 5)]
    nets = build_aux_nets(_OwnAux(lambda s, zs: nn.Linear(3, zs.shape[1]) if s == 1 else None), x, z)
    assert isinstance(nets[0], nn.Linear) and isinstance(nets[1], nn.Sequential)
    with pytest.raises(
        TypeError, match=r"pipeline_aux_net\(1, \.\.\.\) returned str; it must return an nn.Module"
    ):
        build_aux_nets(_OwnAux(lambda s, zs: "net"), x, z)
    with pytest.raises(ValueError, match=r"auxiliary network of stage 1 maps the input \(2, 3\) to \(2, 9\)"):
        build_aux_nets(_OwnAux(lambda s, zs: nn.Linear(3, 9)), x, z)


def test_bad_runtime_and_option_arguments() -> None:
    model = tiny_model()
    stage_blocks, aux_nets = split_trunk_with_aux_nets(model, STAGES, image_batches()[0])
    with pytest.raises(ValueError, match=r"aux_nets has 2 entries; 4 stages need 3"):
        AuxNetRuntime(stage_blocks, aux_nets[:2], model.pipeline_input, model.pipeline_loss)
    with pytest.raises(ValueError, match=r"warmup=-1 must be an integer >= 0"):
        AuxNetRuntime(stage_blocks, aux_nets, model.pipeline_input, model.pipeline_loss, warmup=-1)
    with pytest.raises(ValueError, match=r"stages=4 must be a multiple of the world size \(3 processes\)"):
        AuxNetRuntime(stage_blocks, aux_nets, model.pipeline_input, model.pipeline_loss, rank=0, world_size=3)
    cases = [
        ({"loss": "lagrange"}, r"loss='lagrange' is not one of \('penalty', 'augmented_lagrangian'\)"),
        ({"rho": 0.0}, r"rho=0.0 must be a positive finite penalty weight"),
        ({"rho": float("inf")}, r"rho=inf must be a positive finite"),
        ({"rho_growth": 0.9}, r"rho_growth=0.9 must be a finite factor >= 1"),
        ({"rho": 2.0, "rho_max": 1.0}, r"rho_max=1.0 must be >= rho=2.0"),
        ({"aux_update_interval": -1}, r"aux_update_interval=-1 must be an integer >= 0 \(0 never refits"),
        ({"aux_steps": 0}, r"aux_steps=0 must be an integer >= 1"),
        ({"aux_lr": 0}, r"aux_lr=0 must be a positive learning rate"),
        ({"oracle": "yes"}, r"oracle='yes' must be True or False"),
        ({"stage_input_gradient": 0}, r"stage_input_gradient=0 must be True or False"),
        ({"true_input_loss": "no"}, r"true_input_loss='no' must be True or False"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            AuxNetOptions(**kwargs)


def test_multiplier_shape_must_not_change() -> None:
    model = tiny_model()
    runtime = AuxNetRuntime(
        *split_trunk_with_aux_nets(model, STAGES, image_batches()[0]),
        model.pipeline_input,
        model.pipeline_loss,
    )
    runtime.train_step([image_batches()[0]])
    runtime.multipliers[1] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"multiplier of stage 1's input has shape \(3,\).*loss='penalty'"):
        runtime.train_step([image_batches()[0]])
