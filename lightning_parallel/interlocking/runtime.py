"""Pipelined execution of interlocking backprop, in one process or over ranks with point-to-point messages.

Stages are spread over the ranks of a process group in contiguous runs (rank ``r`` holds stages
``[r * S/R, (r + 1) * S/R)``); with one rank, every stage runs in the calling process (single-process mode).
Each rank runs two kinds of action per micro-batch ``m`` of a step:

- ``F(m)``: receive the input, run the held stages' forwards and send the output on at once; then each held
  stage's own loss (training its head): its input gradient first, sent back as the first held stage's
  *early* message, then its weight gradient; on the last rank the held stages' backwards follow at once;
- ``B(m)``: receive the next rank's early and late messages, compute the held stages' input gradients from
  last to first, send the first held stage's *late* message (the relayed input gradients) back, then
  compute the weight gradients.

A rank's ``B(m)`` depends only on the next ``min(k - 1, ...)`` stages, so the order is 1F1B-like with a
warmup of as many forwards as stages the backward depends on (``k - 1`` hops, clipped at the end): with
``k = 2`` one forward ahead, with ``k = S`` it is exactly 1F1B. There is no flush between steps: a rank
steps its optimizer when its own gradients are complete and starts the next step's forwards while later
ranks still finish the previous step. Every stage computes with the same weights throughout a step and its
gradients accumulate in micro-batch order, so results equal single-process mode exactly.

Messages: activations go forward (tag 0), early messages back (tag 1), late messages back (tag 2),
evaluation activations forward (tag 3). Shapes are inferred once per input shape by a dry run of the whole
trunk (on the meta device when the rank holds only its own stages' weights). Sends are asynchronous; every
blocking receive fails with a ``RuntimeError`` naming the peer after ``timeout_s``, or at once with a
:class:`~lightning_parallel.peers.PeerLost` naming the dead rank when the peer's process is gone.
This module imports no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_parallel.interlocking.plan import InterlockingPlan, stages_of_rank
from lightning_parallel.interlocking.stage import InterlockingStage, LossFn, SimulatedCost
from lightning_parallel.peers import transfer_failure, wait_all
from lightning_parallel.pipeline.micro_batches import batch_size
from lightning_parallel.pipeline.stage_local import has_meta_tensors, meta_outputs

_FORWARD, _EARLY, _LATE, _EVAL = 0, 1, 2, 3
_KINDS = {_FORWARD: "an activation", _EARLY: "an early gradient", _LATE: "a late gradient", _EVAL: "an activation"}
MetricsFn = Callable[[torch.Tensor, Any], Mapping[str, torch.Tensor]]


class InterlockingRuntime:
    """Runs interlocking backprop for the stages held by this rank.

    Args:
        plan: stages and width ``k``.
        stage_blocks: the blocks of every stage (all ``S``; the ones not held are used for shape inference).
        heads: the auxiliary head of every stage but the last (``S - 1`` entries, ``None`` for none).
        input_fn: ``micro_batch -> first block's input`` (the model's ``pipeline_input``).
        loss_fn: ``(prediction, micro_batch) -> mean loss`` (the model's ``pipeline_loss``).
        rank: this process's index among the pipeline's ranks (0 in single-process mode).
        world_size: the number of ranks the stages are spread over (1 for single-process mode).
        group: the process group joining those ranks (``None``: the default group).
        global_ranks: global rank of each pipeline rank (default: the identity).
        warmup: forwards before the first backward on this rank (default: the backward's depth in ranks).
        cost: simulated compute slept per unit of work (benchmarks).
        timeout_s: seconds a receive may wait before failing.
    """

    def __init__(
        self,
        plan: InterlockingPlan,
        stage_blocks: Sequence[nn.Module],
        heads: Sequence[nn.Module | None],
        input_fn: Callable[[Any], torch.Tensor],
        loss_fn: LossFn,
        *,
        rank: int = 0,
        world_size: int = 1,
        group: dist.ProcessGroup | None = None,
        global_ranks: Sequence[int] | None = None,
        warmup: int | None = None,
        cost: SimulatedCost | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        if len(stage_blocks) != plan.stages:
            raise ValueError(
                f"stage_blocks has {len(stage_blocks)} entries; the plan has {plan.stages} stages."
            )
        if len(heads) != plan.stages - 1:
            raise ValueError(f"heads has {len(heads)} entries; {plan.stages} stages need {plan.stages - 1}.")
        self.plan = plan
        self.stage_blocks = list(stage_blocks)
        self.input_fn = input_fn
        self.rank, self.world_size, self.group = rank, world_size, group
        self.global_ranks = list(global_ranks) if global_ranks is not None else list(range(world_size))
        self.held = stages_of_rank(rank, world_size, plan.stages)
        self.stages = {
            s: InterlockingStage(
                s, plan, stage_blocks[s], heads[s] if s < plan.stages - 1 else None, loss_fn, cost=cost
            )
            for s in self.held
        }
        self.is_first, self.is_last = rank == 0, rank == world_size - 1
        self.has_backward = not self.is_last and plan.has_backward(self.held[-1])
        per_rank = len(self.held)
        depth = -(-plan.depth(self.held[-1]) // per_rank) if self.has_backward else 0
        self.warmup = depth if warmup is None else warmup
        self.timeout = timedelta(seconds=timeout_s)
        params = [p for s in self.held for p in stage_blocks[s].parameters()]
        self.device = params[0].device if params else torch.device("cpu")  # where received tensors go
        self._shapes: dict[tuple[Any, ...], list[tuple[torch.Size, torch.dtype]]] = {}
        self._sends: list[Any] = []
        self._early: dict[tuple[int, int], torch.Tensor | None] = {}

    # ------------------------------------------------------------------------------ training
    def order(self, micro_batches: int) -> list[tuple[str, int]]:
        """This rank's actions for a step of ``micro_batches``: ``("F", m)`` and ``("B", m)`` in order."""
        if not self.has_backward:
            return [("F", m) for m in range(micro_batches)]
        return forward_backward_order(micro_batches, self.warmup)

    def train_step(self, micro_batches: Sequence[Any]) -> dict[int, torch.Tensor]:
        """Accumulate into the held stages' (and heads') ``.grad`` the interlocking gradients of one step.

        Args:
            micro_batches: all micro-batches of the step (every rank is given all of them).

        Returns:
            The batch-mean loss of each held stage's head (the true loss for the last stage).
        """
        sizes = [batch_size(mb) for mb in micro_batches]
        total = float(sum(sizes))
        for kind, m in self.order(len(micro_batches)):
            if kind == "F":
                self._forward(m, micro_batches[m], sizes[m] / total)
            else:
                self._backward(m, micro_batches[m])
            self._prune_sends()
        return {s: stage.take_loss() for s, stage in self.stages.items()}

    def _forward(self, m: int, micro_batch: Any, weight: float) -> None:
        shapes = self._stage_shapes(micro_batch)
        first = self.held[0]
        if self.is_first:
            x = self.input_fn(micro_batch)
        else:
            x = self._recv(shapes[first - 1], self.rank - 1, _FORWARD)
        for s in self.held:
            x = self.stages[s].forward(m, x)
        if not self.is_last:
            self._send(x, self.rank + 1, _FORWARD)  # first, so that the next rank starts at once
        for s in self.held:
            self._early[(s, m)] = self.stages[s].own_input(m, micro_batch, weight)
        early = self._early[(first, m)]
        if first > 0 and early is not None:
            self._send(early, self.rank - 1, _EARLY)
        for s in self.held:
            self.stages[s].own_weight(m)
        if self.is_last:
            self._run_backwards(m, remote=None)

    def _backward(self, m: int, micro_batch: Any) -> None:
        last = self.held[-1]
        shape, dtype = self._stage_shapes(micro_batch)[last]
        remote: list[torch.Tensor] = []
        if self.plan.sent_early(last + 1):
            remote.append(self._recv((shape, dtype), self.rank + 1, _EARLY))
        n_late = len(self.plan.sent_late(last + 1))
        if n_late:
            remote.extend(self._recv((torch.Size((n_late, *shape)), dtype), self.rank + 1, _LATE).unbind(0))
        self._run_backwards(m, remote=remote)

    def _run_backwards(self, m: int, remote: list[torch.Tensor] | None) -> None:
        """Apply received gradients to the held stages, last to first: input gradients (then the first one's
        late message is sent), then weight gradients."""
        late: dict[int, torch.Tensor | None] = {}
        with_backward = [s for s in reversed(self.held) if self.plan.has_backward(s)]
        for s in with_backward:
            if s == self.held[-1]:
                received = remote or []
            else:
                early, next_late = self._early.get((s + 1, m)), late.get(s + 1)
                received = ([early] if early is not None else []) + (
                    list(next_late.unbind(0)) if next_late is not None else []
                )
            late[s] = self.stages[s].backward_input(m, received)
        first = self.held[0]
        first_late = late.get(first)
        if first > 0 and first_late is not None:
            self._send(first_late, self.rank - 1, _LATE)
        for s in with_backward:
            self.stages[s].backward_weight(m)
        for s in self.held:
            self._early.pop((s, m), None)

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(
        self, micro_batches: Sequence[Any], metrics_fn: MetricsFn
    ) -> dict[int, dict[str, torch.Tensor]]:
        """Forward every micro-batch without autograd; the held stages' metrics, averaged over the examples.

        Args:
            micro_batches: the micro-batches (every rank is given all of them).
            metrics_fn: ``(prediction, micro_batch) -> {name: batch-mean value}`` (e.g. the model's
                ``pipeline_metrics``); applied to each held stage's head output (the output for the last stage).
        """
        sums: dict[int, dict[str, torch.Tensor]] = {s: {} for s in self.held}
        total = 0
        for micro_batch in micro_batches:
            size = batch_size(micro_batch)
            total += size
            shapes = self._stage_shapes(micro_batch)
            first = self.held[0]
            x = (
                self.input_fn(micro_batch)
                if self.is_first
                else self._recv(shapes[first - 1], self.rank - 1, _EVAL)
            )
            predictions = []
            for s in self.held:
                x, prediction = self.stages[s].evaluate(x)
                predictions.append((s, prediction))
            if not self.is_last:
                self._send(x, self.rank + 1, _EVAL)
            for s, prediction in predictions:
                for name, value in metrics_fn(prediction, micro_batch).items():
                    sums[s][name] = sums[s].get(name, torch.zeros(())) + size * value.detach().float()
            self._prune_sends()
        return {
            s: {name: value / max(total, 1) for name, value in metrics.items()} for s, metrics in sums.items()
        }

    # ------------------------------------------------------------------------------ messages
    def finish(self) -> None:
        """Wait until every message this rank sent has been received."""
        sends, self._sends = self._sends, []
        wait_all(sends, self.timeout, lambda error: self._failure(error, "waiting for its sends to be received", None))

    def _send(self, tensor: torch.Tensor, peer: int, tag: int) -> None:
        tensor = tensor.detach().contiguous()
        try:
            work = dist.isend(tensor, dst=self.global_ranks[peer], group=self.group, tag=tag)
        except RuntimeError as error:
            raise self._failure(error, f"sending {_KINDS.get(tag, 'an activation')}", peer) from error
        self._sends.append((work, tensor))

    def _failure(self, error: RuntimeError, what: str, peer: int | None) -> BaseException:
        """The error to raise for a failed message: the dead rank named, else the peer and the time limit."""
        who = f"Interlocking rank {self.rank}"
        rank = None if peer is None else self.global_ranks[peer]
        return transfer_failure(error, what, who=who, peer=rank, timeout_s=self.timeout.total_seconds())

    def _prune_sends(self) -> None:
        self._sends = [item for item in self._sends if not item[0].is_completed()]

    def _recv(self, spec: tuple[torch.Size, torch.dtype], peer: int, tag: int) -> torch.Tensor:
        shape, dtype = spec
        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        try:
            work = dist.irecv(buffer, src=self.global_ranks[peer], group=self.group, tag=tag)
            if work is not None:
                work.wait(self.timeout)
        except RuntimeError as error:
            raise self._failure(error, f"receiving {_KINDS.get(tag, 'an activation')}", peer) from error
        return buffer

    def _stage_shapes(self, micro_batch: Any) -> list[tuple[torch.Size, torch.dtype]]:
        x = self.input_fn(micro_batch)
        key = (tuple(x.shape), x.dtype)
        if key not in self._shapes:
            self._shapes[key] = infer_stage_outputs(self.stage_blocks, x)
        return self._shapes[key]


def forward_backward_order(micro_batches: int, warmup: int) -> list[tuple[str, int]]:
    """``F(0) .. F(w-1)``, then ``F(m + w), B(m)`` alternately, with ``w = max(0, min(warmup, micro_batches))``.

    The per-rank order of the local-learning runtimes (interlocking and AuxNet): ``("F", m)`` and ``("B", m)``.
    """
    warmup = max(0, min(warmup, micro_batches))
    actions = [("F", m) for m in range(warmup)]
    for m in range(micro_batches):
        if m + warmup < micro_batches:
            actions.append(("F", m + warmup))
        actions.append(("B", m))
    return actions


def infer_stage_outputs(
    stage_blocks: Sequence[nn.Module], x: torch.Tensor
) -> list[tuple[torch.Size, torch.dtype]]:
    """Shape and dtype of every stage's output for input ``x``, by a dry run in eval mode without autograd
    (on the meta device when some stage's weights are not held here)."""
    modes = [m.training for block in stage_blocks for m in block.modules()]
    result = []
    try:
        with torch.no_grad():
            for block in stage_blocks:
                block.eval()
            if has_meta_tensors(stage_blocks):
                return [(out.shape, out.dtype) for out in meta_outputs(stage_blocks, x)]
            for block in stage_blocks:
                x = block(x)
                result.append((x.shape, x.dtype))
    finally:
        for module, mode in zip((m for block in stage_blocks for m in block.modules()), modes):
            module.training = mode
    return result
