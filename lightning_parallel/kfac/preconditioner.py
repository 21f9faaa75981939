"""K-FAC preconditioning of ``nn.Linear`` and ``nn.Conv2d`` gradients, single-process or distributed.

Call :meth:`KFACPreconditioner.step` after the gradients are final (after DDP's all-reduce) and
before the optimizer step; it rewrites the gradients of the supported layers in place, so any
optimizer (SGD, Adam, ...) then steps on the preconditioned gradient.

Design decisions:

- Hooks: a forward hook records the input and registers a hook on the output tensor for its
  gradient. Unlike full backward hooks this works when an in-place activation follows the layer
  (the tensor hook sees the gradient of the layer's own output). Hooks record only while the
  module is in training mode, grad is enabled and the next step is a factor-update step. A
  layer whose hooks never fire (e.g. ``nn.MultiheadAttention.out_proj``, whose weight is used
  through ``F.linear``) keeps no factors and its gradient passes through unchanged.
- Per-example Fisher scale: ``G = n sum g g^T`` over the ``n`` examples of the step (see
  ``factors.py``); the AMP loss scale is divided out (``grad_scale``).
- ``assignment="dp"`` (DP-KFAC): owners by longest-processing-time greedy over the layers' cost
  (``assignment.py``), fixed at the first step from the observed rows (the cost vector is
  max-reduced so all ranks agree). Only the owner records hook data, builds and decomposes the
  factors and preconditions; then one broadcast per owner rank sends its layers' preconditioned
  gradients. No factor communication.
- ``assignment="replicated"`` (D-KFAC): every rank builds every layer's factors from its local
  batch; the upper triangles of the batch factors are averaged with one all-reduce; every rank
  decomposes and preconditions every layer.
- KL-clip scale ``nu = min(1, sqrt(kl_clip / |sum_layers lr^2 <v, g>|)``, computed after the
  broadcast from the full set of layers, so it is the same on every rank; ``lr`` is the learning
  rate of the parameter group holding the layer's weight.
- Non-finite batch factors are not folded in; a failed or non-finite decomposition keeps the
  previous one; a non-finite gradient is left alone. Each case warns; weights never become NaN
  because of K-FAC.
- Checkpoints: :meth:`state_dict` gathers the owners' layer states to every rank (a collective
  under ``dp``: call it on all ranks, as Lightning does when it saves a checkpoint).
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_parallel.kfac.assignment import assign_owners, layer_cost
from lightning_parallel.kfac.communication import Communicator
from lightning_parallel.kfac.factors import gradient_matrix, supported, write_gradient_matrix
from lightning_parallel.kfac.layer import KFACLayer
from lightning_parallel.kfac.options import KFACOptions

COUNTERS = ("factor_seconds", "decomposition_seconds", "precondition_seconds", "communication_seconds")


class KFACPreconditioner:
    """Registers hooks on a model's supported layers and preconditions their gradients.

    Args:
        model: The model; every ``nn.Linear`` and ``nn.Conv2d`` not matched by ``skip_layers``
            is preconditioned.
        options: The hyperparameters (see :class:`KFACOptions`).
        group: Process group over which the gradients are replicated (``None``: the default group
            when one is initialised, otherwise single-process K-FAC).

    Raises:
        ValueError: If the model has no supported layer left after ``skip_layers``.
    """

    def __init__(self, model: nn.Module, options: KFACOptions | None = None, group: Any = None) -> None:
        self.options = options if options is not None else KFACOptions()
        self.comm = Communicator(group)
        self.layers: list[KFACLayer] = []
        for name, module in model.named_modules():
            if not supported(module) or self._skipped(name, module):
                continue
            self.layers.append(KFACLayer(name, module))
        if not self.layers:
            raise ValueError(
                f"`model` ({type(model).__name__}) has no nn.Linear or nn.Conv2d layer left to precondition"
                f" (skip_layers={list(self.options.skip_layers)}); add such layers or loosen `skip_layers`."
            )
        self.steps = 0
        self.owners: list[int] | None = None if self.comm.world_size > 1 else [0] * len(self.layers)
        self.counters: dict[str, float] = dict.fromkeys(COUNTERS, 0.0)
        # the counters' clock; ``time.process_time`` measures CPU work on oversubscribed machines
        self.clock: Callable[[], float] = time.perf_counter
        self.warned_silent: set[str] = set()
        self._handles: list[Any] = []
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.module.register_forward_hook(self._forward_hook(index)))

    # ------------------------------------------------------------------ setup
    def _skipped(self, name: str, module: nn.Module) -> bool:
        return any(
            re.search(p, name) or re.search(p, type(module).__name__) for p in self.options.skip_layers
        )

    def remove_hooks(self) -> None:
        """Removes the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def is_local(self, index: int) -> bool:
        """Whether this rank builds, decomposes and preconditions layer ``index``."""
        if self.options.assignment == "replicated" or self.owners is None:
            return True
        return self.owners[index] == self.comm.rank

    def _forward_hook(self, index: int) -> Any:
        layer = self.layers[index]

        def grad_hook(grad: torch.Tensor) -> None:
            start = self.clock()
            layer.accumulate_grad(grad)
            self.counters["factor_seconds"] += self.clock() - start

        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if not (module.training and torch.is_grad_enabled() and self.is_local(index)):
                return
            if not self.options.is_update_step("factor_update_steps", self.steps):
                return
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            start = self.clock()
            layer.accumulate_input(inputs[0])
            self.counters["factor_seconds"] += self.clock() - start
            output.register_hook(grad_hook)

        return hook

    # ------------------------------------------------------------------ the step
    def step(self, optimizer: torch.optim.Optimizer | None = None, grad_scale: float = 1.0) -> None:
        """Updates factors and decompositions when due, then preconditions the gradients in place.

        Args:
            optimizer: The optimizer about to step; the learning rates for KL-clip come from its
                parameter groups (required when ``kl_clip`` is set).
            grad_scale: The loss scale the recorded output gradients carry (an AMP scaler's scale at
                backward time), divided out of ``G``.

        Raises:
            ValueError: If ``kl_clip`` is set and ``optimizer`` is ``None``.
        """
        step = self.steps
        if self.options.is_update_step("factor_update_steps", step):
            self._update_factors(step, grad_scale)
        if self.options.is_update_step("inv_update_steps", step):
            self._decompose(step)
        self._precondition(step, optimizer)
        for layer in self.layers:
            layer.reset_accumulators()
        self.steps += 1

    def _update_factors(self, step: int, grad_scale: float) -> None:
        if self.owners is None:
            self._assign()
        start = self.clock()
        batch = [
            layer.batch_factors(grad_scale) if self.is_local(i) else None
            for i, layer in enumerate(self.layers)
        ]
        self.counters["factor_seconds"] += self.clock() - start
        if self.options.assignment == "replicated" and self.comm.world_size > 1:
            batch = self._average_factors(batch)
        start = self.clock()
        decay = self.options.at("factor_decay", step)
        for layer, factors in zip(self.layers, batch):
            if factors is None:
                continue
            if not all(math.isfinite(float(f.sum())) for f in factors):
                warnings.warn(
                    f"K-FAC: the factors of layer {layer.name!r} are not finite at step {step}; this update is skipped.",
                    stacklevel=2,
                )
                continue
            layer.update_factors(*factors, decay)
        self.counters["factor_seconds"] += self.clock() - start

    def _assign(self) -> None:
        """Fixes the owners from the first step's rows (``dp``); non-owners drop their hook data."""
        step = self.steps
        fus, ius = (
            int(self.options.at("factor_update_steps", step)),
            int(self.options.at("inv_update_steps", step)),
        )
        costs = torch.tensor(
            [
                layer_cost(
                    layer.in_dim, layer.out_dim, layer.a_rows, factor_update_steps=fus, inv_update_steps=ius
                )
                for layer in self.layers
            ],
            dtype=torch.float64,
        )
        if self.comm.distributed and self.comm.world_size > 1:
            self.comm.bytes_communicated += costs.numel() * costs.element_size()
            dist.all_reduce(costs, op=dist.ReduceOp.MAX, group=self.comm.group)
        self.owners = assign_owners(costs.tolist(), self.comm.world_size)
        for index, layer in enumerate(self.layers):
            if not self.is_local(index):
                layer.drop_state()

    def _average_factors(
        self, batch: list[tuple[torch.Tensor, torch.Tensor] | None]
    ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Averages the batch factors over the ranks (``replicated``); only upper triangles travel."""
        start = self.clock()
        pieces: list[torch.Tensor] = []
        dtype = self.layers[0].dtype
        device = self.layers[0].device
        valid = torch.zeros(len(self.layers), dtype=dtype, device=device)
        for i, (layer, factors) in enumerate(zip(self.layers, batch)):
            ia, ja = torch.triu_indices(layer.in_dim, layer.in_dim, device=device)
            ig, jg = torch.triu_indices(layer.out_dim, layer.out_dim, device=device)
            if factors is None:
                pieces += [torch.zeros(ia.numel(), dtype=dtype, device=device)]
                pieces += [torch.zeros(ig.numel(), dtype=dtype, device=device)]
            else:
                valid[i] = 1.0
                pieces += [factors[0][ia, ja].to(dtype), factors[1][ig, jg].to(dtype)]
        summed = self.comm.all_reduce_sum([*pieces, valid])
        self.counters["communication_seconds"] += self.clock() - start
        counts = summed[-1]
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for i, layer in enumerate(self.layers):
            if counts[i] == 0:
                out.append(None)
                continue
            a = _from_triu(summed[2 * i], layer.in_dim) / counts[i]
            g = _from_triu(summed[2 * i + 1], layer.out_dim) / counts[i]
            out.append((a.to(layer.dtype), g.to(layer.dtype)))
        return out

    def _decompose(self, step: int) -> None:
        start = self.clock()
        damping = self.options.at("damping", step)
        for index, layer in enumerate(self.layers):
            if not self.is_local(index):
                continue
            if layer.a_factor is None or layer.g_factor is None:
                if layer.name not in self.warned_silent:
                    self.warned_silent.add(layer.name)
                    warnings.warn(
                        f"K-FAC: the hooks of layer {layer.name!r} did not fire (its module's forward was not called"
                        " or its output got no gradient); the layer is left to the optimizer.",
                        stacklevel=3,
                    )
                continue
            try:
                layer.decompose(self.options.method, damping, self.options.factored_damping)
            except (RuntimeError, torch.linalg.LinAlgError) as err:
                kept = "keeps its previous decomposition" if layer.decomposition else "is not preconditioned"
                warnings.warn(
                    f"K-FAC: decomposing layer {layer.name!r} failed ({err}); it {kept}.", stacklevel=3
                )
        self.counters["decomposition_seconds"] += self.clock() - start

    def _precondition(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        start = self.clock()
        damping = self.options.at("damping", step)
        grads: list[torch.Tensor] = []
        updates: list[torch.Tensor] = []
        done: list[bool] = []  # whether the layer's update is preconditioned (KL-clip scales only those)
        for index, layer in enumerate(self.layers):
            mat = gradient_matrix(layer.module)
            if mat is None:
                mat = torch.zeros(layer.out_dim, layer.in_dim, dtype=layer.dtype, device=layer.device)
            grads.append(mat)
            if not self.is_local(index) or not layer.decomposition:
                updates.append(mat)
                done.append(False)
            elif not math.isfinite(
                float(mat.sum())
            ):  # one reduction; any inf or NaN makes the sum non-finite
                warnings.warn(
                    f"K-FAC: the gradient of layer {layer.name!r} is not finite at step {step}; it is left unchanged.",
                    stacklevel=3,
                )
                updates.append(mat)
                done.append(False)
            else:
                updates.append(layer.precondition(mat, damping))
                done.append(True)
        self.counters["precondition_seconds"] += self.clock() - start
        if self.options.assignment == "dp" and self.comm.world_size > 1:
            start = self.clock()
            assert self.owners is not None
            for rank in range(self.comm.world_size):
                owned = [i for i, owner in enumerate(self.owners) if owner == rank]
                if not owned:
                    continue
                flags = torch.tensor([float(done[i]) for i in owned], dtype=updates[owned[0]].dtype)
                received = self.comm.broadcast(
                    [*(updates[i] for i in owned), flags.to(updates[owned[0]].device)], rank
                )
                for i, tensor, flag in zip(owned, received, received[-1].tolist()):
                    updates[i], done[i] = tensor, flag > 0.5
            self.counters["communication_seconds"] += self.clock() - start
        start = self.clock()
        nu = self._kl_clip_scale(step, optimizer, grads, updates, done)
        for layer, update, scaled in zip(self.layers, updates, done):
            if layer.has_grad():
                write_gradient_matrix(layer.module, update * nu if scaled and nu != 1.0 else update)
        self.counters["precondition_seconds"] += self.clock() - start

    def _kl_clip_scale(
        self,
        step: int,
        optimizer: torch.optim.Optimizer | None,
        grads: list[torch.Tensor],
        updates: list[torch.Tensor],
        done: list[bool],
    ) -> float:
        if self.options.kl_clip is None:
            return 1.0
        if optimizer is None:
            raise ValueError(
                "`optimizer=None` but `kl_clip` is set; pass the optimizer or set `kl_clip=None`."
            )
        kl_clip = self.options.at("kl_clip", step)
        lrs = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        total = 0.0
        for layer, grad, update, scaled in zip(self.layers, grads, updates, done):
            if scaled and self._counts_for_kl(layer):
                lr = float(lrs.get(id(layer.module.weight), 0.0))
                total += float((update * grad).sum()) * lr * lr
        total = self._reduce_kl(total)
        if total == 0.0 or math.isnan(total):
            return 1.0
        return min(1.0, math.sqrt(kl_clip / abs(total)))

    def _counts_for_kl(self, layer: Any) -> bool:
        """Whether ``layer``'s term enters the KL-clip sum (a subclass holding copies counts each once)."""
        return True

    def _reduce_kl(self, total: float) -> float:
        """The KL-clip sum over every rank that shares this update (this rank alone here)."""
        return total

    # ------------------------------------------------------------------ bookkeeping
    def curvature_bytes(self) -> int:
        """Bytes of curvature state (running factors and decompositions) this rank holds."""
        return sum(layer.curvature_bytes() for layer in self.layers)

    def metrics(self) -> dict[str, float]:
        """This rank's counters: seconds building factors, decomposing, preconditioning and
        communicating, ``kfac_seconds`` (the first three), bytes communicated and curvature bytes."""
        out = dict(self.counters)
        out["kfac_seconds"] = (
            out["factor_seconds"] + out["decomposition_seconds"] + out["precondition_seconds"]
        )
        out["bytes_communicated"] = float(self.comm.bytes_communicated)
        out["curvature_bytes"] = float(self.curvature_bytes())
        return out

    def state_dict(self) -> dict[str, Any]:
        """Step count, owners and every layer's factors and decomposition (a collective under ``dp``)."""
        local = {layer.name: layer.state_dict() for i, layer in enumerate(self.layers) if self.is_local(i)}
        if self.options.assignment == "dp" and self.comm.world_size > 1:
            gathered: list[Any] = [None] * self.comm.world_size
            dist.all_gather_object(gathered, local, group=self.comm.group)
            local = {name: state for part in gathered for name, state in part.items()}
        return {
            "steps": self.steps,
            "owners": self.owners,
            "world_size": self.comm.world_size,
            "assignment": self.options.assignment,
            "layers": local,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`'s output; each rank keeps the layers it owns.

        Args:
            state: The saved state.
        """
        self.steps = int(state["steps"])
        same_layout = (
            state["world_size"] == self.comm.world_size and state["assignment"] == self.options.assignment
        )
        self.owners = state["owners"] if same_layout else None
        if self.comm.world_size == 1:
            self.owners = [0] * len(self.layers)
        for layer in self.layers:
            if layer.name in state["layers"]:
                layer.load_state_dict(state["layers"][layer.name])
        if self.owners is None:
            fus = int(self.options.at("factor_update_steps", self.steps))
            ius = int(self.options.at("inv_update_steps", self.steps))
            costs = [
                layer_cost(
                    layer.in_dim,
                    layer.out_dim,
                    layer.rows_per_step,
                    factor_update_steps=fus,
                    inv_update_steps=ius,
                )
                for layer in self.layers
            ]
            self.owners = assign_owners(costs, self.comm.world_size)
        for index, layer in enumerate(self.layers):
            if not self.is_local(index):
                layer.drop_state()


def _from_triu(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """The symmetric ``(dim, dim)`` matrix whose upper triangle (row-major) is ``packed``."""
    i, j = torch.triu_indices(dim, dim, device=packed.device)
    mat = torch.zeros(dim, dim, dtype=packed.dtype, device=packed.device)
    mat[i, j] = packed
    return mat + mat.triu(1).t()
