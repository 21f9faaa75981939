"""Run one rank's share of a pipeline schedule with ``torch.distributed`` point-to-point operations.

Design decisions:

- Activations go forward and gradients backward as ``isend``/``irecv`` pairs addressed by global rank
  and told apart by a tag that encodes (message kind, replica, stage, micro-batch), so messages between
  the same two ranks may be in flight in any order on gloo. Backends that ignore tags (NCCL) match
  messages between two ranks in issue order: each replica's messages therefore travel on their own
  group (``PipelineGroups.p2p_groups``), where both ends handle them in micro-batch order (the
  generators run every stage's forwards, and its backwards, in micro-batch order). No
  ``batch_isend_irecv`` (it can hang on gloo). Sends are waited for at the end of the step.
- Shapes are learned: the first activation sent across a stage boundary for a micro-batch of a given
  shape signature is preceded by a small header (dtype, shape); later ones are not. Both sides key the
  cache by the signature of the micro-batch, which every rank has. Gradients need no header: their
  shape is the activation's, known to the receiver.
- Gradients: the last stage back-propagates ``loss_m / N``, so each held module's ``.grad`` accumulates
  the gradient of the mean loss over the step's N micro-batches (callers zero gradients before a step).
  Split backward: ``I`` computes the input gradient (``autograd.grad`` with ``retain_graph``) and sends it,
  ``W`` computes the weight gradients from the same graph; ``W`` repeats the part of the backward that
  the two share.
- Chimera: at an ``R`` action, the gradients of that (replica, stage) are flattened into one buffer and
  all-reduced (sum) asynchronously over the stage's group (the two ranks holding its copies); the step
  waits for them at its end and copies the sums back, so both copies hold identical full gradients.
- ``trace`` records each action's (start, end) in seconds since the step began, starting after the
  action's input arrived, so waiting shows as idle time.
- A receive, send or all-reduce that does not complete within ``timeout_s`` (or whose peer's connection
  closed) raises a ``RuntimeError`` naming the peer; when the peer's process is gone (checked with the
  table of :mod:`lightning_parallel.peers`), a :class:`~lightning_parallel.peers.PeerLost` naming the dead
  rank, for the posting of a send or receive too (gloo raises there when the connection is already closed).

This module imports no Lightning.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_parallel.peers import transfer_failure
from lightning_parallel.pipeline.groups import PipelineGroups
from lightning_parallel.pipeline.schedule import Action, ActionKind, Schedule
from lightning_parallel.utils.flat import flatten, unflatten

__all__ = ["PipelineRuntime"]

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool]
_HEADER = 16  # dtype code, ndim, up to 14 dims
_ACT, _HEAD, _GRAD = 0, 1, 2
_TRAIN, _EVAL, _SIDE = 0, 1, 2


def _signature(batch: Any) -> tuple[Any, ...]:
    if isinstance(batch, Tensor):
        return (tuple(batch.shape), str(batch.dtype))
    if isinstance(batch, dict):
        return tuple((k, _signature(v)) for k, v in sorted(batch.items(), key=lambda kv: str(kv[0])))
    if isinstance(batch, (list, tuple)):
        return tuple(_signature(v) for v in batch)
    return ()


class PipelineRuntime:
    """Executes this rank's actions of a schedule.

    Args:
        schedule: the schedule of one optimizer step.
        groups: this rank's process groups (see ``build_pipeline_groups``).
        stage_modules: (replica, stage) -> the module of that stage, for every stage this rank holds.
        input_fn: micro-batch -> the first stage's input.
        loss_fn: (last stage's output, micro-batch) -> the micro-batch's mean loss.
        timeout_s: how long a receive, send or all-reduce may wait, in seconds.
        device: where received tensors are placed (default: the first held parameter's device, else CPU).
    """

    def __init__(
        self,
        schedule: Schedule,
        groups: PipelineGroups,
        stage_modules: Mapping[tuple[int, int], nn.Module],
        input_fn: Callable[[Any], Tensor],
        loss_fn: Callable[[Tensor, Any], Tensor],
        *,
        timeout_s: float = 300.0,
        device: torch.device | str | None = None,
    ) -> None:
        if groups.stages != schedule.stages:
            raise ValueError(
                f"The schedule has stages={schedule.stages} but the groups were built for stages={groups.stages}."
            )
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s!r} must be positive.")
        held = set(schedule.stages_of(groups.pipeline_rank))
        if set(stage_modules) != held:
            raise ValueError(
                f"Pipeline rank {groups.pipeline_rank} holds (replica, stage) {sorted(held)} in a {schedule.kind} "
                f"schedule; stage_modules has {sorted(stage_modules)}."
            )
        if schedule.replicas == 2 and not groups.stage_groups:
            raise ValueError(f"A {schedule.kind} schedule needs the stage groups of an even stages count.")
        self.schedule = schedule
        self.groups = groups
        self.stage_modules = dict(stage_modules)
        self.input_fn = input_fn
        self.loss_fn = loss_fn
        self.timeout = timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        if device is None:
            params = [p for m in self.stage_modules.values() for p in m.parameters()]
            device = params[0].device if params else torch.device("cpu")
        self.device = torch.device(device)
        self.actions = schedule.actions[groups.pipeline_rank]
        self.trace: list[tuple[Action, float, float]] = []
        self._known: set[tuple[Any, ...]] = set()
        self._shapes: dict[tuple[Any, ...], tuple[torch.dtype, tuple[int, ...]]] = {}
        self._sends: list[tuple[Any, Tensor, int]] = []
        # a second backward riding this schedule's sends (K-FAC's sampled Fisher): ``begin(micro_batches)``
        # says whether the step runs it, ``last_forward(replica, m, output)`` sees each last-stage output,
        # ``backward(module, replica, stage, m, x, out, grad)`` returns the input's gradient (``out`` and
        # ``grad`` are None at the last stage); its gradients travel after the real ones, in their order
        self.side_backward: Any = None

    # ------------------------------------------------------------------ communication
    def _tag(self, space: int, kind: int, replica: int, stage: int, micro_batch: int) -> int:
        s = self.schedule
        return (((space * 3 + kind) * 2 + replica) * s.stages + stage) * s.micro_batches + micro_batch

    def _peer(self, replica: int, stage: int) -> int:
        return self.groups.global_rank_of(self.schedule.rank_of(replica, stage))

    def _wait(self, work: Any, what: str, peer: int) -> None:
        try:
            work.wait(self.timeout)
        except RuntimeError as err:
            raise self._failure(err, what, peer) from err

    def _failure(self, err: RuntimeError, what: str, peer: int) -> BaseException:
        """The error to raise for a failed transfer: the dead rank named, else the peer and the timeout."""
        who = f"Pipeline rank {self.groups.pipeline_rank} (global rank {self.groups.global_rank})"
        return transfer_failure(err, what, who=who, peer=peer, timeout_s=self.timeout_s)

    def _isend(self, tensor: Tensor, peer: int, tag: int, replica: int) -> None:
        try:
            work = dist.isend(tensor, dst=peer, tag=tag, group=self.groups.p2p_groups[replica])
        except RuntimeError as err:
            raise self._failure(err, "posting a send", peer) from err
        # let go of the tensors of sends that finished (raising if one failed), so memory stays bounded
        pending = []
        for entry in self._sends:
            if entry[0].is_completed():
                self._wait(entry[0], "a send", entry[2])
            else:
                pending.append(entry)
        self._sends = [*pending, (work, tensor, peer)]

    def _recv(
        self, shape: tuple[int, ...], dtype: torch.dtype, peer: int, tag: int, replica: int, what: str
    ) -> Tensor:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        try:
            work = dist.irecv(buf, src=peer, tag=tag, group=self.groups.p2p_groups[replica])
        except RuntimeError as err:
            raise self._failure(err, f"posting the receive of {what}", peer) from err
        self._wait(work, f"receiving {what}", peer)
        return buf

    def _send_activation(self, out: Tensor, action: Action, space: int, key: tuple[Any, ...]) -> None:
        peer = self._peer(action.replica, action.stage + 1)
        args = (action.replica, action.stage, action.micro_batch)
        if key not in self._known:
            if out.dim() > _HEADER - 2:
                raise ValueError(
                    f"Stage {action.stage} output has {out.dim()} dimensions; at most {_HEADER - 2}."
                )
            header = torch.zeros(_HEADER, dtype=torch.int64, device=self.device)
            header[0], header[1] = _DTYPES.index(out.dtype), out.dim()
            header[2 : 2 + out.dim()] = torch.tensor(out.shape, dtype=torch.int64)
            self._isend(header, peer, self._tag(space, _HEAD, *args), action.replica)
            self._known.add(key)
        self._isend(out.detach().contiguous(), peer, self._tag(space, _ACT, *args), action.replica)

    def _recv_activation(self, action: Action, space: int, key: tuple[Any, ...]) -> Tensor:
        peer = self._peer(action.replica, action.stage - 1)
        args = (action.replica, action.stage - 1, action.micro_batch)
        if key not in self._shapes:
            header = self._recv(
                (_HEADER,),
                torch.int64,
                peer,
                self._tag(space, _HEAD, *args),
                action.replica,
                f"the shape of {action}",
            )
            ndim = int(header[1])
            self._shapes[key] = (_DTYPES[int(header[0])], tuple(int(v) for v in header[2 : 2 + ndim]))
        dtype, shape = self._shapes[key]
        return self._recv(
            shape, dtype, peer, self._tag(space, _ACT, *args), action.replica, f"the input of {action}"
        )

    def _finish_sends(self) -> None:
        sends, self._sends = self._sends, []
        for work, _, peer in sends:
            self._wait(work, "a send", peer)

    # ------------------------------------------------------------------ execution
    def train_step(self, micro_batches: Sequence[Any]) -> Tensor:
        """Run this rank's actions for one optimizer step; return (1/N) * the sum of the losses computed here.

        Args:
            micro_batches: all N micro-batches of the step (every rank gets all of them).
        """
        self._check_count(micro_batches)
        n = self.schedule.micro_batches
        last = self.schedule.stages - 1
        stash: dict[tuple[int, int, int], list[Any]] = {}
        reductions: list[tuple[Any, Tensor, list[nn.Parameter], int]] = []
        total = torch.zeros((), device=self.device)
        self.trace = []
        side = self.side_backward if self.side_backward is not None and self.side_backward.begin(micro_batches) else None
        t0 = time.perf_counter()
        for action in self.actions:
            start = time.perf_counter() - t0
            rep, s, m = action.replica, action.stage, action.micro_batch
            module = self.stage_modules[(rep, s)]
            key3 = (rep, s, m)
            if action.kind is ActionKind.FORWARD:
                mb = micro_batches[m]
                key = (rep, s, _signature(mb))
                if s == 0:
                    x = self.input_fn(mb)
                else:
                    x = self._recv_activation(action, _TRAIN, (rep, s - 1, _signature(mb)))
                    start = time.perf_counter() - t0  # the trace shows compute, not the wait
                    if x.is_floating_point():
                        x.requires_grad_(True)
                out = module(x)
                if s == last:
                    if side is not None:
                        side.last_forward(rep, m, out)
                    loss = self.loss_fn(out, mb)
                    total = total + loss.detach() / n
                    stash[key3] = [x, loss / n, None]
                else:
                    self._check_output(out, action)
                    self._send_activation(out, action, _TRAIN, key)
                    stash[key3] = [x, out, None]
            elif action.kind in (ActionKind.BACKWARD, ActionKind.BACKWARD_INPUT):
                x, out, _ = stash[key3]
                grad = None
                if s < last:
                    peer = self._peer(rep, s + 1)
                    tag = self._tag(_TRAIN, _GRAD, rep, s, m)
                    grad = self._recv(
                        tuple(out.shape), out.dtype, peer, tag, rep, f"the output gradient of {action}"
                    )
                    start = time.perf_counter() - t0
                send_grad = s > 0 and x.requires_grad
                side_grad_x = None if side is None else self._side_step(side, action, module, x, out, last)
                if action.kind is ActionKind.BACKWARD:
                    if out.requires_grad:
                        torch.autograd.backward(out, grad)
                    del stash[key3]
                    grad_x = x.grad if send_grad else None
                else:
                    stash[key3][2] = grad
                    grad_x = None
                    if x.requires_grad and out.requires_grad:
                        (grad_x,) = torch.autograd.grad(out, x, grad, retain_graph=True)
                if send_grad:
                    if grad_x is None:
                        grad_x = torch.zeros_like(x)
                    tag = self._tag(_TRAIN, _GRAD, rep, s - 1, m)
                    self._isend(grad_x.contiguous(), self._peer(rep, s - 1), tag, rep)
                    if side is not None:
                        side_x = side_grad_x if side_grad_x is not None else torch.zeros_like(x)
                        tag = self._tag(_SIDE, _GRAD, rep, s - 1, m)
                        self._isend(side_x.contiguous(), self._peer(rep, s - 1), tag, rep)
            elif action.kind is ActionKind.BACKWARD_WEIGHT:
                x, out, grad = stash.pop(key3)
                params = [p for p in module.parameters() if p.requires_grad]
                if params and out.requires_grad:
                    torch.autograd.backward(out, grad, inputs=params)
            else:
                reductions.append(self._start_all_reduce(module, s))
            self.trace.append((action, start, time.perf_counter() - t0))
        for work, flat, params, s in reductions:
            self._wait(work, f"the all-reduce of stage {s}'s gradients", self._pair_peer())
            self._unflatten(flat, params)
        self._finish_sends()
        return total

    def _side_step(
        self, side: Any, action: Action, module: nn.Module, x: Tensor, out: Tensor, last: int
    ) -> Tensor | None:
        """The side backward of one (replica, stage, micro-batch), on the graph the real backward frees next."""
        rep, s, m = action.replica, action.stage, action.micro_batch
        if s == last:
            return side.backward(module, rep, s, m, x, None, None)  # type: ignore[no-any-return]
        tag = self._tag(_SIDE, _GRAD, rep, s, m)
        grad = self._recv(
            tuple(out.shape), out.dtype, self._peer(rep, s + 1), tag, rep, f"the side output gradient of {action}"
        )
        return side.backward(module, rep, s, m, x, out, grad)  # type: ignore[no-any-return]

    @torch.no_grad()
    def forward_only(self, micro_batches: Sequence[Any]) -> list[tuple[int, Tensor]]:
        """Forward every micro-batch through the pipeline without autograd (validation, test).

        Returns:
            (micro-batch, last stage's output) for the micro-batches whose last stage is on this rank.
        """
        self._check_count(micro_batches)
        last = self.schedule.stages - 1
        outputs: list[tuple[int, Tensor]] = []
        for action in self.actions:
            if action.kind is not ActionKind.FORWARD:
                continue
            rep, s, m = action.replica, action.stage, action.micro_batch
            mb = micro_batches[m]
            x = (
                self.input_fn(mb)
                if s == 0
                else self._recv_activation(action, _EVAL, (rep, s - 1, _signature(mb)))
            )
            out = self.stage_modules[(rep, s)](x)
            if s == last:
                outputs.append((m, out))
            else:
                self._check_output(out, action)
                self._send_activation(out, action, _EVAL, (rep, s, _signature(mb)))
        self._finish_sends()
        return sorted(outputs, key=lambda pair: pair[0])

    def _check_count(self, micro_batches: Sequence[Any]) -> None:
        if len(micro_batches) != self.schedule.micro_batches:
            raise ValueError(
                f"The {self.schedule.kind} schedule runs micro_batches={self.schedule.micro_batches} per step; "
                f"got {len(micro_batches)} micro-batches."
            )

    @staticmethod
    def _check_output(out: Any, action: Action) -> None:
        if not isinstance(out, Tensor):
            raise TypeError(
                f"Stage {action.stage} returned {type(out).__name__}; a pipeline stage must return one Tensor."
            )

    def _pair_peer(self) -> int:
        return self.groups.global_rank_of(self.schedule.stages - 1 - self.groups.pipeline_rank)

    def _start_all_reduce(self, module: nn.Module, stage: int) -> tuple[Any, Tensor, list[nn.Parameter], int]:
        params = [p for p in module.parameters() if p.requires_grad]
        flat = (
            flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
            if params
            else torch.zeros(1, device=self.device)
        )
        try:
            work = dist.all_reduce(flat, group=self.groups.stage_groups[stage], async_op=True)
        except RuntimeError as err:
            raise self._failure(err, f"starting the all-reduce of stage {stage}'s gradients", self._pair_peer()) from err
        return work, flat, params, stage

    @staticmethod
    def _unflatten(flat: Tensor, params: list[nn.Parameter]) -> None:
        for p, chunk in zip(params, unflatten(flat, params)):
            if p.grad is None:
                p.grad = chunk.clone()
            else:
                p.grad.copy_(chunk)
