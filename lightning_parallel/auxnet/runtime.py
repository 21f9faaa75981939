"""Forward-unlocked execution of AuxNet training, in one process or over ranks with point-to-point messages.

Stages are spread over the ranks in contiguous runs (rank ``r`` holds stages ``[r * S/R, (r + 1) * S/R)``,
as in interlocking backprop); with one rank every stage runs in the calling process (single-process mode).
Per micro-batch ``m`` a rank holding stages ``a .. b`` runs

- ``F(m)``: every held stage's auxiliary input from the trunk's input (no waiting), ``z_a`` sent back to rank
  ``r - 1`` at once (the *target* message), the held stages' forwards, ``u_b`` sent on to rank ``r + 1`` (the
  *output* message);
- ``B(m)``: receive ``u_{a-1}`` and ``z_{b+1}`` (both sent during the neighbours' own ``F(m)``, which never
  waits), then every held stage's local loss and its backward.

A rank's order is ``F(0) .. F(w-1)``, then ``F(m + w), B(m)`` alternately (``w = warmup``, default 1, so a
message has a whole forward's time to arrive). No rank waits for a chain of predecessors: the dependencies
reach one rank in each direction and are met by work the neighbour does first. There is no flush between
steps; every stage computes with the same weights throughout a step, so results equal single-process mode.

Traffic per training step, per boundary between two ranks, for a batch of ``B`` examples whose stage input has
``n`` elements of ``e`` bytes: ``B * n * e`` forward (outputs) plus ``B * n * e`` back (targets); a refit step
adds ``B * n * e`` forward (the true activations, one end-to-end forward). Multipliers travel never: both ranks
of a boundary compute the same residual and update their copies of its multiplier identically.

Refits (every ``aux_update_interval`` steps, at the start of the step, on the step's batch): one end-to-end
forward without autograd gives every stage's true input ``h_s``; then ``aux_steps`` Adam steps (one optimizer
per stage, learning rate ``aux_lr``) on ``(1/2) mean((a_s(x) - h_s) ** 2)``. Their gradients never touch the
``.grad`` the step accumulates. With ``true_input_loss`` the last stage's part of that forward keeps its graph
and the task loss on the true input is added to the step's gradient of the last stage.

With ``oracle`` each stage's input is the previous stage's true output (received before its forward: serial),
the targets are the stages' own outputs, and no auxiliary network is used or refitted.

Messages: outputs forward (tag 0), targets back (tag 1), refit activations forward (tag 2), evaluation
activations forward (tag 3). Shapes are inferred once per input shape by a dry run of the whole trunk.
This module imports no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_parallel.auxnet.messages import Messenger
from lightning_parallel.auxnet.options import AuxNetOptions
from lightning_parallel.auxnet.stage import AuxNetStage, LossFn, sleep
from lightning_parallel.interlocking.plan import stages_of_rank
from lightning_parallel.interlocking.runtime import forward_backward_order, infer_stage_outputs
from lightning_parallel.interlocking.stage import SimulatedCost
from lightning_parallel.pipeline.micro_batches import batch_size

_OUTPUT, _TARGET, _REFIT, _EVAL = 0, 1, 2, 3
_NAMES = {
    _OUTPUT: "a stage output",
    _TARGET: "an auxiliary target",
    _REFIT: "a refit activation",
    _EVAL: "an activation",
}
MetricsFn = Callable[[torch.Tensor, Any], Mapping[str, torch.Tensor]]


class AuxNetRuntime:
    """Runs AuxNet training for the stages held by this rank.

    Args:
        stage_blocks: the blocks of every stage (all ``S``; the ones not held are used for shape inference).
        aux_nets: the auxiliary network of stages ``1 .. S - 1`` (``S - 1`` entries).
        input_fn: ``micro_batch -> first block's input`` (the model's ``pipeline_input``).
        loss_fn: ``(prediction, micro_batch) -> mean loss`` (the model's ``pipeline_loss``).
        options: the objective, ``rho`` and the refits.
        rank: this process's index among the pipeline's ranks (0 in single-process mode).
        world_size: the number of ranks the stages are spread over (1 for single-process mode).
        group: the process group joining those ranks (``None``: the default group).
        global_ranks: global rank of each pipeline rank (default: the identity).
        warmup: forwards before the first backward on this rank. Default 1.
        cost: simulated compute slept per unit of stage work (benchmarks).
        aux_cost: simulated compute of an auxiliary network's forward and backward (benchmarks).
        timeout_s: seconds a receive may wait before failing.
    """

    def __init__(
        self,
        stage_blocks: Sequence[nn.Module],
        aux_nets: Sequence[nn.Module],
        input_fn: Callable[[Any], torch.Tensor],
        loss_fn: LossFn,
        options: AuxNetOptions | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        group: dist.ProcessGroup | None = None,
        global_ranks: Sequence[int] | None = None,
        warmup: int = 1,
        cost: SimulatedCost | None = None,
        aux_cost: SimulatedCost | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        stages = len(stage_blocks)
        if len(aux_nets) != stages - 1:
            raise ValueError(f"aux_nets has {len(aux_nets)} entries; {stages} stages need {stages - 1}.")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup={warmup!r} must be an integer >= 0, e.g. 1.")
        self.options = options or AuxNetOptions()
        self.num_stages = stages
        self.stage_blocks = list(stage_blocks)
        self.aux_nets = list(aux_nets)
        self.input_fn = input_fn
        self.rank, self.world_size = rank, world_size
        self.held = stages_of_rank(rank, world_size, stages)
        self.first, self.last = self.held[0], self.held[-1]
        oracle = self.options.oracle
        self.stages = {
            s: AuxNetStage(
                s,
                stages,
                stage_blocks[s],
                aux_nets[s - 1] if s > 0 else None,
                loss_fn,
                oracle=oracle,
                cost=cost,
                aux_cost=aux_cost,
                input_gradient=self.options.stage_input_gradient,
            )
            for s in self.held
        }
        self.warmup = warmup
        self.cost, self.aux_cost = cost, aux_cost
        params = [p for s in self.held for p in stage_blocks[s].parameters()]
        device = params[0].device if params else torch.device("cpu")
        self.messenger = Messenger(
            rank,
            global_ranks if global_ranks is not None else range(world_size),
            group=group,
            device=device,
            timeout_s=timeout_s,
            names=_NAMES,
        )
        self.refit_optimizers: dict[int, torch.optim.Optimizer] = {
            s: torch.optim.Adam(self.stages[s].aux_params, lr=self.options.aux_lr)
            for s in self.held
            if self.stages[s].aux_params
        }
        # boundary b (input of stage b) -> multiplier, for every boundary next to a held stage
        self.boundaries = sorted({b for s in self.held for b in (s, s + 1) if 1 <= b <= stages - 1})
        self.multipliers: dict[int, torch.Tensor] = {}
        self.step = 0
        self.last_step_bytes = 0
        self._shapes: dict[tuple[Any, ...], list[tuple[torch.Size, torch.dtype]]] = {}

    # ------------------------------------------------------------------------------ training
    def order(self, micro_batches: int) -> list[tuple[str, int]]:
        """This rank's actions for a step of ``micro_batches``: ``("F", m)`` and ``("B", m)`` in order."""
        return forward_backward_order(micro_batches, self.warmup)

    def train_step(self, micro_batches: Sequence[Any]) -> dict[int, dict[str, torch.Tensor]]:
        """Accumulate into the held stages' (and auxiliary networks') ``.grad`` the gradients of one step.

        Args:
            micro_batches: all micro-batches of the step (every rank is given all of them).

        Returns:
            Per held stage, batch means of ``loss`` (last stage: the task loss on its auxiliary input),
            ``penalty`` (stages >= 1: the constraint term at its input) and ``residual`` (stages >= 1: the
            mean squared residual at its input).
        """
        sent = self.messenger.bytes_sent
        sizes = [batch_size(mb) for mb in micro_batches]
        weights = [size / float(sum(sizes)) for size in sizes]
        if self.options.refits_at(self.step):
            self.refit(micro_batches)
        rho = self.options.rho_schedule.value(self.step)
        for kind, m in self.order(len(micro_batches)):
            if kind == "F":
                self._forward(m, micro_batches[m])
            else:
                self._backward(m, micro_batches[m], weights[m], rho)
        stats: dict[int, dict[str, torch.Tensor]] = {}
        residuals: dict[int, torch.Tensor] = {}
        for s in reversed(self.held):  # a boundary's residual from the stage it feeds, where held
            stats[s], by_boundary = self.stages[s].take_stats()
            for boundary, value in by_boundary.items():
                residuals.setdefault(boundary, value)
        if self.options.uses_multipliers:
            for boundary in self.boundaries:
                self.multipliers[boundary] = (
                    self._multiplier(boundary, residuals[boundary]) + rho * residuals[boundary]
                )
        self.step += 1
        self.last_step_bytes = self.messenger.bytes_sent - sent
        return dict(sorted(stats.items()))

    def _forward(self, m: int, micro_batch: Any) -> None:
        x = self.input_fn(micro_batch)
        for s in self.held:
            target = self.stages[s].begin(m, x)
            if s == self.first and s > 0 and target is not None:
                self.messenger.send(target, self.rank - 1, _TARGET)  # first: the previous rank needs it
        output = None
        if self.options.oracle and self.first > 0:
            output = self._recv_input(micro_batch, self.first, _OUTPUT)
        for s in self.held:
            output = self.stages[s].forward(m, output)
        if self.last < self.num_stages - 1 and output is not None:
            self.messenger.send(output, self.rank + 1, _OUTPUT)

    def _backward(self, m: int, micro_batch: Any, weight: float, rho: float) -> None:
        oracle = self.options.oracle
        previous: dict[int, torch.Tensor | None] = {}
        following: dict[int, torch.Tensor | None] = {}
        for s in self.held:
            if s == 0:
                previous[s] = None
            elif s > self.first:
                previous[s] = self.stages[s - 1].output_value(m)
            elif oracle:
                previous[s] = self.stages[s].input_value(m)  # the true output it was given
            else:
                previous[s] = self._recv_input(micro_batch, s, _OUTPUT)
            if s == self.num_stages - 1:
                following[s] = None
            elif s < self.last:
                following[s] = self.stages[s + 1].input_value(m)
            elif oracle:
                following[s] = self.stages[s].output_value(m)  # the next stage's true input
            else:
                following[s] = self._recv_input(micro_batch, s + 1, _TARGET, peer=self.rank + 1)
        self._check_multipliers(micro_batch)
        multipliers = dict(self.multipliers)  # none before the first step: zero
        for s in self.held:
            self.stages[s].backward(
                m,
                micro_batch,
                weight,
                rho,
                previous_output=previous[s],
                next_input=following[s],
                multipliers=multipliers,
            )

    def _multiplier(self, boundary: int, like: torch.Tensor) -> torch.Tensor:
        value = self.multipliers.get(boundary)
        return torch.zeros_like(like) if value is None else value

    def _check_multipliers(self, micro_batch: Any) -> None:
        if not self.multipliers:
            return
        shapes = self._stage_shapes(micro_batch)
        for boundary, value in self.multipliers.items():
            expected = shapes[boundary - 1][0][1:]
            if value.shape != expected:
                raise ValueError(
                    f"The multiplier of stage {boundary}'s input has shape {tuple(value.shape)} but this batch's "
                    f"stage input has {tuple(expected)} per example; the augmented Lagrangian needs a fixed "
                    "stage-input shape (use loss='penalty' for inputs whose shape changes)."
                )

    # ------------------------------------------------------------------------------ refits
    def refit(self, micro_batches: Sequence[Any]) -> dict[int, float]:
        """Refit the held stages' auxiliary networks to their true inputs on ``micro_batches``.

        Returns:
            Per held stage with an auxiliary network, the refit loss before its first step.
        """
        sizes = [batch_size(mb) for mb in micro_batches]
        weights = [size / float(sum(sizes)) for size in sizes]
        inputs = [self.input_fn(mb) for mb in micro_batches]
        true: dict[int, list[torch.Tensor]] = {s: [] for s in self.held}
        last = self.num_stages - 1
        for mb, x, weight in zip(micro_batches, inputs, weights):
            h = x if self.first == 0 else self._recv_input(mb, self.first, _REFIT)
            for s in self.held:
                true[s].append(h)
                if s == last and self.options.true_input_loss:
                    self.stages[s].true_input_backward(h, mb, weight)  # the step's gradient, not the refit's
                    continue
                h = self.stages[s].evaluate(h)
                sleep(self.cost.forward if self.cost else 0.0)
            if self.last < self.num_stages - 1:
                self.messenger.send(h, self.rank + 1, _REFIT)
        first_losses: dict[int, float] = {}
        for s, optimizer in self.refit_optimizers.items():
            stage = self.stages[s]
            aux_net = stage.aux_net
            if aux_net is None:  # refit_optimizers holds only stages with an auxiliary network
                continue
            kept = [p.grad for p in stage.aux_params]  # the step's own gradients stay untouched
            for step in range(self.options.aux_steps):
                for p in stage.aux_params:
                    p.grad = None
                total = 0.0
                for x, h, weight in zip(inputs, true[s], weights):
                    loss = 0.5 * (aux_net(x) - h).square().mean()
                    (loss * weight).backward(inputs=stage.aux_params)
                    total += weight * float(loss.detach())
                    if self.aux_cost:
                        sleep(self.aux_cost.forward + self.aux_cost.backward_weight)
                if step == 0:
                    first_losses[s] = total
                optimizer.step()
            for p, grad in zip(stage.aux_params, kept):
                p.grad = grad
        return first_losses

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self, micro_batches: Sequence[Any], metrics_fn: MetricsFn) -> dict[str, torch.Tensor]:
        """The end-to-end forward (stage after stage) of every micro-batch without autograd.

        Args:
            micro_batches: the micro-batches (every rank is given all of them).
            metrics_fn: ``(output, micro_batch) -> {name: batch-mean value}`` of the model's final output.

        Returns:
            On the rank holding the last stage, the metrics averaged over the examples; ``{}`` elsewhere.
        """
        sums: dict[str, torch.Tensor] = {}
        total = 0
        for micro_batch in micro_batches:
            x = self.input_fn(micro_batch)
            h = x if self.first == 0 else self._recv_input(micro_batch, self.first, _EVAL)
            for s in self.held:
                h = self.stages[s].evaluate(h)
            if self.last < self.num_stages - 1:
                self.messenger.send(h, self.rank + 1, _EVAL)
                continue
            size = batch_size(micro_batch)
            total += size
            for name, value in metrics_fn(h, micro_batch).items():
                sums[name] = sums.get(name, torch.zeros(())) + size * value.detach().float().cpu()
        return {name: value / max(total, 1) for name, value in sums.items()}

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The step count, the multipliers of the held stages' inputs and the held stages' refit optimizers."""
        return {
            "step": self.step,
            "multipliers": {b: v.clone() for b, v in self.multipliers.items() if b in self.stages},
            "refit_optimizers": {s: opt.state_dict() for s, opt in self.refit_optimizers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, merged over all ranks (keys of stages not held are ignored).

        A boundary's multiplier is kept by both ranks next to it, so each rank takes the ones it needs.
        """
        self.step = int(state["step"])
        device = self.messenger.device
        self.multipliers = {
            int(b): v.to(device) for b, v in state.get("multipliers", {}).items() if int(b) in self.boundaries
        }
        for s, optimizer in self.refit_optimizers.items():
            saved = state.get("refit_optimizers", {}).get(s)
            if saved is not None:
                optimizer.load_state_dict(saved)

    def finish(self) -> None:
        """Wait until every message this rank sent has been received."""
        self.messenger.finish()

    # ------------------------------------------------------------------------------ messages
    def _recv_input(self, micro_batch: Any, stage: int, tag: int, *, peer: int | None = None) -> torch.Tensor:
        """Receive a tensor shaped like ``stage``'s input (from the previous rank unless ``peer`` is given)."""
        shape, dtype = self._stage_shapes(micro_batch)[stage - 1]
        return self.messenger.recv(shape, dtype, self.rank - 1 if peer is None else peer, tag)

    def _stage_shapes(self, micro_batch: Any) -> list[tuple[torch.Size, torch.dtype]]:
        x = self.input_fn(micro_batch)
        key = (tuple(x.shape), x.dtype)
        if key not in self._shapes:
            self._shapes[key] = infer_stage_outputs(self.stage_blocks, x)
        return self._shapes[key]
