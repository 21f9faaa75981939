"""Worker functions and models for the multi-process runtime tests (module level, so spawn can import them)."""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_parallel.pipeline.groups import build_pipeline_groups
from lightning_parallel.pipeline.runtime import PipelineRuntime
from lightning_parallel.pipeline.schedule import build_schedule
from lightning_parallel.pipeline.timeline import gather_traces

LR = 0.1
STEPS = 3


class TokenEmbedding(nn.Module):
    def __init__(self, vocab: int, block: int, dim: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(block, dim) * 0.02)

    def forward(self, idx: Tensor) -> Tensor:
        return self.tok(idx) + self.pos[: idx.shape[1]]  # (B, T, C)


class Head(nn.Module):
    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.norm(x))


def make_blocks(model: str, count: int) -> list[nn.Module]:
    """``count`` blocks of an MLP or of a small transformer, with fixed initial weights."""
    torch.manual_seed(0)
    if model == "mlp":
        dims = [8] + [16] * (count - 1) + [4]
        return [nn.Sequential(nn.Linear(dims[i], dims[i + 1]), nn.Tanh()) for i in range(count)]
    dim, vocab, block = 16, 11, 6
    layers = [
        nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        for _ in range(count - 2)
    ]
    return [TokenEmbedding(vocab, block, dim), *layers, Head(dim, vocab)]


def make_batches(model: str, batch: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    # the last step's batch is twice as large: activation shapes change, new shape headers must travel
    for size in [batch] * (STEPS - 1) + [2 * batch]:
        if model == "mlp":
            out.append((torch.randn(size, 8, generator=gen), torch.randint(0, 4, (size,), generator=gen)))
        else:
            out.append(
                (
                    torch.randint(0, 11, (size, 6), generator=gen),
                    torch.randint(0, 11, (size, 6), generator=gen),
                )
            )
    return out


def loss_fn(output: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
    return nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]), batch[1].reshape(-1))


def input_fn(batch: tuple[Tensor, Tensor]) -> Tensor:
    return batch[0]


def reference(model: str, stages: int, batch: int) -> list[dict[str, Tensor]]:
    """Single-process full-batch SGD: the state of each stage after STEPS steps."""
    blocks = make_blocks(model, stages)
    full = nn.Sequential(*blocks)
    opt = torch.optim.SGD(full.parameters(), lr=LR)
    for x, y in make_batches(model, batch):
        opt.zero_grad()
        loss_fn(full(x), (x, y)).backward()
        opt.step()
    return [{k: v.detach().clone() for k, v in b.state_dict().items()} for b in blocks]


def split(batch: tuple[Tensor, Tensor], n: int) -> list[tuple[Tensor, Tensor]]:
    return list(zip(batch[0].chunk(n), batch[1].chunk(n)))


def train_worker(rank: int, world_size: int, cases: list[tuple[str, str, int]], batch: int) -> list[Any]:
    """For each (kind, model, N): STEPS SGD steps through the pipeline; the held stages' states."""
    torch.manual_seed(0)
    groups = build_pipeline_groups(world_size, world_size, timeout_s=60.0)
    results = []
    for kind, model, n in cases:
        schedule = build_schedule(kind, world_size, n)
        blocks = make_blocks(model, world_size)
        modules = {rs: copy.deepcopy(blocks[rs[1]]) for rs in schedule.stages_of(groups.pipeline_rank)}
        runtime = PipelineRuntime(schedule, groups, modules, input_fn, loss_fn, timeout_s=60.0)
        params = [p for m in modules.values() for p in m.parameters()]
        opt = torch.optim.SGD(params, lr=LR)
        losses = []
        for b in make_batches(model, batch):
            opt.zero_grad()
            loss = runtime.train_step(split(b, n))
            dist.all_reduce(loss, group=groups.pipeline_group)
            losses.append(float(loss))
            opt.step()
        traces = gather_traces(runtime.trace, groups.pipeline_group)
        assert [len(t) for t in traces] == [len(a) for a in schedule.actions]
        x0 = make_batches(model, batch)[0]
        outs = runtime.forward_only(split(x0, n))
        # numpy, not tensors: tensors would travel as shared-memory handles that die with the worker
        states = {
            rs: {k: v.detach().numpy().copy() for k, v in m.state_dict().items()} for rs, m in modules.items()
        }
        results.append((kind, model, states, losses, [(m, o.numpy().copy()) for m, o in outs]))
    return results


def dying_worker(rank: int, world_size: int, mode: str) -> str:
    """Rank 1 leaves (exits or stalls) before sending its gradient; rank 0 must raise, naming rank 1."""
    groups = build_pipeline_groups(world_size, world_size, timeout_s=30.0)
    schedule = build_schedule("1f1b", world_size, 2)
    blocks = make_blocks("mlp", world_size)
    modules = {rs: blocks[rs[1]] for rs in schedule.stages_of(groups.pipeline_rank)}
    runtime = PipelineRuntime(schedule, groups, modules, input_fn, loss_fn, timeout_s=2.0)
    x, y = make_batches("mlp", 4)[0]
    if rank == 1:
        if mode == "stall":
            time.sleep(5.0)
            return "stalled"
        import os

        os._exit(0)  # dies without a word, mid-step
    try:
        runtime.train_step(split((x, y), 2))
    except RuntimeError as err:
        return str(err)
    return "no error"
