"""K-FAC preconditioning of ``nn.Linear`` and ``nn.Conv2d`` gradients, single-process or distributed.

Call :meth:`KFACPreconditioner.step` after the gradients are final (after DDP's all-reduce) and
before the optimizer step; it rewrites the gradients of the supported layers in place, so any
optimizer (SGD, Adam, ...) then steps on the preconditioned gradient.

Design decisions:

- Hooks: a forward hook records the input and registers a hook on the output tensor for its
  gradient. Unlike full backward hooks this works when an in-place activation follows the layer
  (the tensor hook sees the gradient of the layer's own output, once per forward call: a second
  traversal, such as a zero-bubble schedule's weight-gradient pass, adds nothing). The forward hooks are
  registered only while the next step is a factor-update step (and only on the layers this rank
  records), so other steps pay nothing for them; they record only in training mode with grad
  enabled. A
  layer whose hooks never fire (e.g. ``nn.MultiheadAttention.out_proj``, whose weight is used
  through ``F.linear``) keeps no factors and its gradient passes through unchanged.
- Per-example Fisher scale: ``G = n sum g g^T`` over the ``n`` examples of the step (see
  ``factors.py``); the AMP loss scale is divided out (``grad_scale``).
- Sampled (true) Fisher (``fisher="gaussian"``, ``"categorical"`` or a callable): a forward hook
  on the module producing the prediction runs, on factor-update steps, ``torch.autograd.grad`` of
  the negative log-likelihood of targets sampled from the prediction (summed over the examples)
  with respect to the recorded layers' weights. The output-gradient hooks record during that
  pass only, so ``G`` is the mean over examples of each example's own outer product, while
  ``.grad`` and DDP's all-reduce see only the training loss. The empirical Fisher vanishes with
  the gradients near a solution and then needs heavy damping; the sampled one does not.
- Per step, one synchronisation: ``<v, g>`` of every preconditioned layer is both the finiteness
  check and the KL-clip term (a non-finite one keeps the layer's plain gradient).
- ``assignment="dp"`` (DP-KFAC): owners by longest-processing-time greedy over the layers' cost
  (``assignment.py``), fixed at the first step from the observed rows (the cost vector is
  max-reduced so all ranks agree). Only the owner records hook data, builds and decomposes the
  factors. No factor communication. Where the decomposition is used is the ``placement``
  (KAISA's gradient-worker fraction at its two ends): ``"owner"`` preconditions on the owner, then
  one broadcast per owner rank sends its layers' preconditioned gradients, every step;
  ``"all"``: one broadcast per owner rank sends its layers' decompositions when they change (every
  ``inv_update_steps``) and every rank preconditions every layer itself (its gradients are the
  same all-reduced ones), with no per-step traffic. Every rank installs the broadcast copy (the
  owner too), so all ranks precondition with bit-identical matrices. ``"auto"`` takes the placement
  with fewer bytes per step by :func:`~lightning_parallel.kfac.assignment.placement_costs` for the
  intervals at the first step, and logs the choice with both placements' bytes and memory.
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

import logging
import math
import re
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_parallel.kfac import recording
from lightning_parallel.kfac.assignment import assign_owners, layer_cost, placement_costs
from lightning_parallel.kfac.communication import Communicator, or_zeros
from lightning_parallel.kfac.factors import from_triu, gradient_matrix, write_gradient_matrix
from lightning_parallel.kfac.fisher import prediction_module, sampled_output_grad
from lightning_parallel.kfac.layer import KFACLayer
from lightning_parallel.kfac.options import KFACOptions
from lightning_parallel.layers.registry import find_targets, weight_coverage

log = logging.getLogger(__name__)
COUNTERS = ("factor_seconds", "decomposition_seconds", "precondition_seconds", "communication_seconds")


class KFACPreconditioner:
    """Registers hooks on a model's supported layers and preconditions their gradients.

    Args:
        model: The model; every ``nn.Linear`` and ``nn.Conv2d`` not matched by ``skip_layers``
            is preconditioned.
        options: The hyperparameters (see :class:`KFACOptions`).
        group: Process group over which the gradients are replicated (``None``: the default group
            when one is initialised, otherwise single-process K-FAC).
        allow_empty: Accept a model with no supported layer (a pipeline rank whose stages hold
            none: it preconditions nothing but takes part in the collectives). Default ``False``.

    Raises:
        ValueError: If the model has no supported layer left after ``skip_layers`` (unless
            ``allow_empty``).
    """

    # the sampled Fisher's backward starts at the prediction's forward hook (a pipeline runs its own pass)
    samples_in_forward = True

    def __init__(
        self, model: nn.Module, options: KFACOptions | None = None, group: Any = None, *, allow_empty: bool = False
    ) -> None:
        self.options = options if options is not None else KFACOptions()
        self.comm = Communicator(group)
        # the layer registry says which modules are linear-like and how to read them
        self.layers = [
            KFACLayer(
                t.name,
                t,
                self.options.factor_subsample,
                position_subsample=self.options.position_subsample,
                rank=self.options.factor_rank,
            )
            for t in find_targets(model, self._skipped)
        ]
        self.coverage = weight_coverage(model, [layer.weight for layer in self.layers], "K-FAC")
        # dtype and device of the small tensors K-FAC communicates (a rank without layers needs them too)
        first = self.layers[0].weight if self.layers else next(model.parameters(), None)
        self.device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
        self.dtype = self.layers[0].dtype if self.layers else torch.float32
        if not self.layers and not allow_empty:
            raise ValueError(
                f"`model` ({type(model).__name__}) has no nn.Linear or nn.Conv2d layer left to precondition"
                f" (skip_layers={list(self.options.skip_layers)}); add such layers or loosen `skip_layers`."
            )
        self.steps = 0
        self.owners: list[int] | None = None if self.comm.world_size > 1 else [0] * len(self.layers)
        # where the decompositions are used: "owner" or "all" (resolved from "auto" with the owners)
        self.placement = "all" if self.options.assignment == "replicated" else self.options.placement
        if self.comm.world_size == 1:
            self.placement = "all"
        self.costs_by_placement: dict[str, dict[str, float]] = {}  # the cost model's figures, once placed
        self._warned_positions = False  # position_subsample: the layers without positions, warned once
        self._slots: dict[int, list[int]] = {}  # stagger_decompositions: interval -> each layer's step in it
        self.counters: dict[str, float] = dict.fromkeys(COUNTERS, 0.0)
        # the counters' clock; ``time.process_time`` measures CPU work on oversubscribed machines
        self.clock: Callable[[], float] = time.perf_counter
        self.warned_silent: set[str] = set()
        # sampled Fisher: layers recorded since the last sampled backward; whether one is running
        self.sampling = False
        self._pending: dict[int, None] = {}
        self._generator: torch.Generator | None = None
        self._output_module = (
            prediction_module(model, self.options.fisher_output, self.layers[-1].module)
            if self.options.sampled_fisher and self.samples_in_forward
            else None
        )
        # forward hooks are registered only while the next step updates the factors, and only on
        # the layers this rank records, so other steps run the model at its plain speed
        self._handles: list[Any] = []
        self._hooks_enabled = True
        self._sync_hooks()

    # ------------------------------------------------------------------ setup
    def _skipped(self, name: str, module: nn.Module) -> bool:
        return any(
            re.search(p, name) or re.search(p, type(module).__name__) for p in self.options.skip_layers
        )

    def remove_hooks(self) -> None:
        """Removes the hooks from the model (for good: factors are no longer recorded)."""
        self._hooks_enabled = False
        self._sync_hooks()

    def _sync_hooks(self) -> None:
        """Registers the forward hooks when the next step updates the factors, removes them otherwise."""
        record = self._hooks_enabled and self.options.is_update_step("factor_update_steps", self.steps)
        if record and not self._handles:
            for index, layer in enumerate(self.layers):
                if self.is_local(index):
                    self._handles.append(layer.target.observe(self._forward_hook(index)))
            if self._output_module is not None:  # after the layers' hooks: it sees their pending outputs
                self._handles.append(self._output_module.register_forward_hook(self._sample_hook))
        elif not record and self._handles:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    def is_local(self, index: int) -> bool:
        """Whether this rank records, builds and decomposes layer ``index``'s factors."""
        if self.options.assignment == "replicated" or self.owners is None:
            return True
        return self.owners[index] == self.comm.rank

    def preconditions(self, index: int) -> bool:
        """Whether this rank preconditions layer ``index`` (its owner, or every rank under ``"all"``)."""
        return self.placement == "all" or self.is_local(index)

    def _forward_hook(self, index: int) -> Any:
        layer = self.layers[index]

        sampled = self.options.sampled_fisher

        def hook(x: torch.Tensor, output: torch.Tensor) -> None:
            if recording.is_paused():  # a solver's Jacobian product, not part of the model's gradient
                return
            if not (layer.module.training and torch.is_grad_enabled() and self.is_local(index)):
                return
            if not output.requires_grad:
                return
            start = self.clock()
            layer.accumulate_input(x)
            self.counters["factor_seconds"] += self.clock() - start
            recorded = False

            def grad_hook(grad: torch.Tensor) -> None:
                # one G contribution per forward call: a zero-bubble schedule's separate weight-gradient
                # pass traverses the output again with the same gradient
                nonlocal recorded
                if recorded or (sampled and not self.sampling):  # sampled: G comes from the sampled pass
                    return
                recorded = True
                start = self.clock()
                layer.accumulate_grad(grad)
                self.counters["factor_seconds"] += self.clock() - start

            output.register_hook(grad_hook)
            if sampled:
                self._pending[index] = None

        return hook

    def _sample_hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        """At the prediction's forward: backward of a loss on sampled targets into the pending layers."""
        if not self._pending:
            return
        pending, self._pending = list(self._pending), {}
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        # one entry per parameter: the projections of an attention share its in_proj_weight
        weights = list({id(w): w for w in (self.layers[i].weight for i in pending) if w.requires_grad}.values())
        if not weights:
            return
        start = self.clock()
        fisher = self.options.fisher
        self.sampling = True
        try:
            if callable(fisher):
                loss = fisher(output)
                torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True)
            else:
                grad = sampled_output_grad(output.detach(), str(fisher), self._rng(output.device))
                torch.autograd.grad(output, weights, grad_outputs=grad, retain_graph=True, allow_unused=True)
        finally:
            self.sampling = False
        self.counters["factor_seconds"] += self.clock() - start

    def _rng(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.options.fisher_seed + self.comm.rank)
        return self._generator

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
        self._pending = {}
        if self.options.is_update_step("factor_update_steps", step):
            # the sampled Fisher's backward is not scaled by an AMP scaler
            self._update_factors(step, 1.0 if self.options.sampled_fisher else grad_scale)
        due = self._decompositions_due(step)
        if due is not None:
            self._decompose(step, due)
        self._precondition(step, optimizer)
        for layer in self.layers:
            layer.reset_accumulators()
        self.steps += 1
        self._sync_hooks()

    def _update_factors(self, step: int, grad_scale: float) -> None:
        if self.owners is None:
            self._assign()
        if self.options.position_subsample > 1 and not self._warned_positions:
            self._warn_positionless()
        start = self.clock()
        batch = [
            layer.batch_factors(grad_scale, per_example=self.options.sampled_fisher)
            if self.is_local(i)
            else None
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

    def _warn_positionless(self) -> None:
        """Warns once which recorded layers ``position_subsample`` cannot thin (one position per example)."""
        seen = [layer for layer in self.layers if layer.has_positions is not None]
        if not seen:
            return
        self._warned_positions = True
        without = [layer.name for layer in seen if not layer.has_positions]
        if without:
            warnings.warn(
                f"K-FAC: position_subsample={self.options.position_subsample} thins {len(seen) - len(without)} of the"
                f" {len(seen)} layers this rank records; the other {len(without)} ({without[:3]}...) have one position"
                " per example and use every row.",
                stacklevel=3,
            )

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
        self._place(fus, ius)
        self._drop_remote()
        self._rehook()

    def _place(self, fus: int, ius: int) -> None:
        """Resolves ``placement="auto"`` by the cost model, once the owners are known; logs the choice."""
        assert self.owners is not None
        costs = placement_costs(
            [(layer.in_dim, layer.out_dim) for layer in self.layers],
            self.owners,
            method=self.options.method,
            factor_rank=self.options.factor_rank,
            factor_update_steps=fus,
            inv_update_steps=ius,
            element_size=self.dtype.itemsize,
        )
        self.costs_by_placement = costs
        if self.options.assignment == "replicated" or self.comm.world_size == 1:
            return
        if self.options.placement == "auto":
            cheaper = costs["all"]["bytes_per_step"] < costs["owner"]["bytes_per_step"]
            self.placement = "all" if cheaper else "owner"
        if self.comm.rank == 0:
            log.info(
                "K-FAC placement %r (%s) for factor/decomposition intervals %d/%d over %d ranks: bytes per step"
                " owner %.0f, all %.0f (replicated %.0f); curvature bytes per rank owner %.0f, all %.0f",
                self.placement,
                "chosen by the cost model" if self.options.placement == "auto" else "set",
                fus,
                ius,
                self.comm.world_size,
                costs["owner"]["bytes_per_step"],
                costs["all"]["bytes_per_step"],
                costs["replicated"]["bytes_per_step"],
                costs["owner"]["curvature_bytes"],
                costs["all"]["curvature_bytes"],
            )

    def _average_factors(
        self, batch: list[tuple[torch.Tensor, torch.Tensor] | None]
    ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Averages the batch factors over the ranks (``replicated``); only upper triangles travel."""
        start = self.clock()
        pieces: list[torch.Tensor] = []
        dtype, device = self.dtype, self.device
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
            a = from_triu(summed[2 * i], layer.in_dim) / counts[i]
            g = from_triu(summed[2 * i + 1], layer.out_dim) / counts[i]
            out.append((a.to(layer.dtype), g.to(layer.dtype)))
        return out

    def _decompositions_due(self, step: int) -> list[bool] | None:
        """Which layers decompose at ``step`` (``None``: none). Without staggering every layer on
        multiples of ``inv_update_steps``; with it, every layer at step 0 and then each at its own
        step of the interval (:meth:`_stagger_slots`)."""
        if not self.options.stagger_decompositions or step == 0:
            return [True] * len(self.layers) if self.options.is_update_step("inv_update_steps", step) else None
        interval = int(self.options.at("inv_update_steps", step))
        due = [slot == step % interval for slot in self._stagger_slots(interval)]
        return due if any(due) else None

    def _stagger_slots(self, interval: int) -> list[int]:
        """Each layer's step within an interval of ``interval`` steps, by longest-processing-time
        greedy on the layers' decomposition cost (``in^3 + out^3``): the same on every rank and for
        any owners, so staggered DP-KFAC gives single-process staggered K-FAC's update. With at least
        as many steps in the interval as layers, no step decomposes two layers, on any owner."""
        if interval not in self._slots:
            costs = [float(layer.in_dim**3 + layer.out_dim**3) for layer in self.layers]
            self._slots[interval] = assign_owners(costs, interval)
        return self._slots[interval]

    def _decompose(self, step: int, due: list[bool]) -> None:
        start = self.clock()
        damping = self.options.at("damping", step)
        for index, layer in enumerate(self.layers):
            if not (self.is_local(index) and due[index]):
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
        if self.placement == "all" and self.options.assignment == "dp" and self.comm.world_size > 1:
            start = self.clock()
            self._broadcast_decompositions(due)
            self.counters["communication_seconds"] += self.clock() - start

    def _broadcast_decompositions(self, due: list[bool]) -> None:
        """``placement="all"``: each owner rank broadcasts the decompositions of its layers that were
        due (one broadcast per owner); every rank, the owner included, installs the received copy."""
        assert self.owners is not None
        method = self.options.method
        dtype = self.dtype
        for rank in range(self.comm.world_size):
            owned = [i for i, owner in enumerate(self.owners) if owner == rank and due[i]]
            if not owned:
                continue
            pieces = [[p.to(dtype) for p in self.layers[i].decomposition_tensors(method)] for i in owned]
            meta = torch.tensor(
                [float(bool(self.layers[i].decomposition)) for i in owned] + [self.layers[i].pi for i in owned],
                dtype=dtype,
                device=self.device,
            )
            received = self.comm.broadcast([*(p for layer in pieces for p in layer), meta], rank)
            flags = received[-1].tolist()
            offset = 0
            for k, i in enumerate(owned):
                layer = self.layers[i]
                count = len(pieces[k])
                if flags[k] > 0.5:
                    parts = [t.to(layer.dtype) for t in received[offset : offset + count]]
                    layer.set_decomposition(method, parts, flags[len(owned) + k])
                offset += count

    def _precondition(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        start = self.clock()
        damping = self.options.at("damping", step)
        n = len(self.layers)
        updates: list[torch.Tensor | None] = [None] * n  # None: the layer keeps its plain gradient
        grads: list[torch.Tensor | None] = [None] * n
        for index, layer in enumerate(self.layers):
            if self.preconditions(index) and layer.decomposition:
                mat = gradient_matrix(layer.target)
                if mat is not None:
                    grads[index], updates[index] = mat, layer.precondition(mat, damping)
        # <v, g> per layer: the KL-clip terms, and one finiteness check of gradient and update (any
        # inf or NaN in either makes it non-finite), read back with a single synchronisation
        terms = [0.0] * n
        local = [i for i in range(n) if updates[i] is not None]
        if local:
            products = torch.stack(
                [torch.vdot(updates[i].reshape(-1), grads[i].reshape(-1)) for i in local]  # type: ignore[union-attr]
            )
            for i, value in zip(local, products.tolist()):
                if math.isfinite(value):
                    terms[i] = value
                    continue
                grad = grads[i]
                assert grad is not None
                what = "gradient" if not bool(torch.isfinite(grad).all()) else "preconditioned gradient"
                warnings.warn(
                    f"K-FAC: the {what} of layer {self.layers[i].name!r} is not finite at step {step}; the layer"
                    " keeps its plain gradient.",
                    stacklevel=3,
                )
                updates[i] = None
        self.counters["precondition_seconds"] += self.clock() - start
        if self.placement == "owner" and self.comm.world_size > 1:
            start = self.clock()
            self._broadcast_updates(updates, terms)
            self.counters["communication_seconds"] += self.clock() - start
        start = self.clock()
        nu = self._kl_clip_scale(step, optimizer, terms, [u is not None for u in updates])
        for layer, update in zip(self.layers, updates):
            if update is not None and layer.has_grad():
                write_gradient_matrix(layer.target, update, nu)
        self.counters["precondition_seconds"] += self.clock() - start

    def _broadcast_updates(self, updates: list[torch.Tensor | None], terms: list[float]) -> None:
        """``dp``: each owner rank broadcasts its layers' updates, whether each is set, and their terms."""
        assert self.owners is not None
        for rank in range(self.comm.world_size):
            owned = [i for i, owner in enumerate(self.owners) if owner == rank]
            if not owned:
                continue
            layer0 = self.layers[owned[0]]
            payload = [or_zeros(updates[i], self.layers[i]) for i in owned]
            meta = torch.tensor(
                [float(updates[i] is not None) for i in owned] + [terms[i] for i in owned],
                dtype=payload[0].dtype,
                device=layer0.device,
            )
            received = self.comm.broadcast([*payload, meta], rank)
            meta_values = received[-1].tolist()
            for k, i in enumerate(owned):
                updates[i] = received[k] if meta_values[k] > 0.5 else None
                terms[i] = meta_values[len(owned) + k]

    def _kl_clip_scale(
        self, step: int, optimizer: torch.optim.Optimizer | None, terms: list[float], done: list[bool]
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
        for layer, term, scaled in zip(self.layers, terms, done):
            if scaled and self._counts_for_kl(layer):
                lr = float(lrs.get(id(layer.weight), 0.0))
                total += term * lr * lr
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
            "placement": self.placement,
            "layers": local,
            "fisher_rng": None if self._generator is None else self._generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`'s output; each rank keeps the layers it owns.

        Args:
            state: The saved state.
        """
        self.steps = int(state["steps"])
        self._generator = None
        rng = state.get("fisher_rng")
        if rng is not None and self.options.sampled_fisher:
            self._generator = torch.Generator(device=self.device)
            if self.comm.world_size == 1:
                self._generator.set_state(rng)  # exact resume
            else:  # the checkpoint holds one rank's generator: a fresh, distinct stream per rank
                self._generator.manual_seed(self.options.fisher_seed + self.comm.rank + 100_003 * self.steps)
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
        self._place(
            int(self.options.at("factor_update_steps", self.steps)),
            int(self.options.at("inv_update_steps", self.steps)),
        )
        self._drop_remote()
        self._rehook()

    def _drop_remote(self) -> None:
        """Frees what this rank does not need of the layers other ranks own: everything under
        ``"owner"``, the factors (not the decomposition) under ``"all"``."""
        for index, layer in enumerate(self.layers):
            if self.is_local(index):
                continue
            if self.placement == "all":
                layer.drop_factors()
            else:
                layer.drop_state()

    def _rehook(self) -> None:
        """Re-registers the hooks after the owners changed (only local layers carry them)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._sync_hooks()
