"""QAT under DistributedDataParallel (2 gloo processes): every rank ends with the same quantizer state."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_parallel.quantization import convert_to_qat, quantizer_state_dict
from tests.helpers.distributed import run_distributed


def _batch(rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 8, generator=g) * (rank + 1)  # ranks see differently scaled data


def _worker(rank: int, world_size: int) -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = convert_to_qat(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))
    ddp = DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    for step in range(3):
        loss = ddp(_batch(rank, step)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"quantizers": quantizer_state_dict(model), "weights": dict(model.state_dict())}


def test_ddp_ranks_agree_on_quantizer_state() -> None:
    results = run_distributed(_worker, 2, timeout=300.0)  # generous: spawning is slow on a loaded machine
    for key, value in results[0]["quantizers"].items():
        torch.testing.assert_close(results[1]["quantizers"][key], value, msg=key)
    for key, value in results[0]["weights"].items():
        torch.testing.assert_close(results[1]["weights"][key], value, msg=key)
    # the input quantizer of the first layer starts from rank 0's first batch (DDP broadcasts buffers)
    first = _batch(0, 0)
    expected = min(2 * first.abs().mean() / 127**0.5, first.abs().max() / 127)
    torch.testing.assert_close(results[1]["quantizers"]["0.input_quantizer.init_scale"], expected)
