"""K-FAC over the stage copies a pipeline rank holds (pure torch, no Lightning).

Under a pipeline schedule each rank trains a few stages; Chimera keeps two copies of every stage
(replica 0 "down" and replica 1 "up") on two ranks of the same pipeline, whose gradients the
runtime sums before the optimizer step. :class:`PipelineKFACPreconditioner` makes every copy of a
stage precondition exactly as single-device K-FAC on the whole batch would.

Design decisions:

- Hooks sit on the ``nn.Linear`` / ``nn.Conv2d`` layers of every held copy; layers are named
  ``replica<r>.stage<s>.<name>``.
- The two copies of a stage see disjoint micro-batches. Before the step's factors are formed, the
  raw hook sums of both copies (``sum a a^T``, ``sum g g^T``, rows and examples) are added with one
  all-reduce over the pair group, so ``A`` is the mean over all rows of the step and ``G`` is
  rescaled by the step's total number of examples (each micro-batch loss carries ``1/N``, so the
  recorded output gradients are on the scale of the whole batch). Both ranks then hold
  bit-identical factors and precondition their copies identically. With one replica (1F1B, GPipe)
  a stage has one holder and nothing is exchanged.
- Across data-parallel pipeline replicas the batch factors are averaged over the data-parallel
  group with the ``replicated`` machinery of :class:`KFACPreconditioner` (the gradients are
  averaged there too). ``assignment="dp"`` is only meaningful within that group; with more than one
  pipeline replica it is refused, since the two holders of a stage need the same layers locally.
- Gradient accumulation: the runtime scales the gradients by ``1 / accumulate_grad_batches``
  after backward (not the loss), so the recorded output gradients are that many times too large;
  the factor is divided out of ``G`` like an AMP loss scale.
- KL-clip: ``sum lr^2 <v, g>`` is taken over the replica-0 copies (each stage once) and summed over
  the pipeline, so every rank uses the single-device clip factor.
- Sampled Fisher (``fisher="gaussian"``, ``"categorical"`` or a callable): on factor-update steps
  a second backward rides the schedule (:class:`~lightning_parallel.kfac.pipeline_fisher.SampledFisherPass`,
  installed as the runtime's ``side_backward``) from the last stage's output with the sampled
  targets' gradient, through every stage with the schedule's own sends, recording ``G`` only; the
  whole batch's random numbers are drawn in one call, so the samples equal one device's.
- Checkpoints: :meth:`state_dict` gathers every rank's layers over the pipeline (a collective), and
  the sampled Fisher's generator of a rank holding a last stage (the only ranks that draw).
- A rank whose stages hold no supported layer warns once and keeps taking part in every
  collective (KL-clip sum, checkpoint gather), so the other ranks never wait for it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_parallel.kfac.options import KFACOptions
from lightning_parallel.kfac.pipeline_fisher import SampledFisherPass
from lightning_parallel.kfac.preconditioner import KFACPreconditioner


class PipelineKFACPreconditioner(KFACPreconditioner):
    """K-FAC for the stage copies one pipeline rank holds.

    Args:
        stage_modules: ``(replica, stage) -> module`` of the copies this rank trains.
        options: The hyperparameters (see :class:`KFACOptions`).
        pipeline_group: The ranks of this rank's pipeline (``None``: no communication).
        pair_group: The two ranks holding the copies of this rank's stages under Chimera, ``None``
            when every stage has one holder.
        data_parallel_group: The ranks holding the same stages in the other pipeline replicas
            (``None`` or a group of one rank: a single pipeline).
        accumulate_grad_batches: Batches per optimizer step. The pipeline runtime backpropagates
            each batch's unscaled loss and divides the gradients by this number afterwards, so the
            recorded output gradients carry it too: it is divided out of ``G``. Default 1.

    Raises:
        ValueError: If ``assignment="dp"`` with several pipeline replicas, or ``fisher_output`` is set.
    """

    samples_in_forward = False  # the sampled Fisher's backward rides the schedule: ``sampled_pass``

    def __init__(
        self,
        stage_modules: dict[tuple[int, int], nn.Module],
        options: KFACOptions | None = None,
        *,
        pipeline_group: Any = None,
        pair_group: Any = None,
        data_parallel_group: Any = None,
        accumulate_grad_batches: int = 1,
    ) -> None:
        options = options if options is not None else KFACOptions()
        distributed = dist.is_available() and dist.is_initialized()
        dp_size = (
            dist.get_world_size(data_parallel_group) if distributed and data_parallel_group is not None else 1
        )
        check_pipeline_options(options, "a pipeline strategy", data_parallel_size=dp_size)
        nested = _nested(stage_modules)
        super().__init__(nested, options, group=data_parallel_group if dp_size > 1 else None, allow_empty=True)
        if not self.layers:
            warnings.warn(
                f"K-FAC: the stages this rank holds ({sorted(stage_modules)} as (replica, stage)) have no nn.Linear or"
                " nn.Conv2d layer to precondition; the rank only takes part in K-FAC's collectives.",
                stacklevel=2,
            )
        if dp_size == 1:  # one pipeline: every exchange is explicit below, the base class stays local
            self.comm.distributed, self.comm.world_size, self.comm.rank = False, 1, 0
            self.owners = [0] * len(self.layers)
            self.placement = "all"
        self.accumulate_grad_batches = max(1, int(accumulate_grad_batches))
        self.pipeline_group = pipeline_group if distributed else None
        self.pair_group = pair_group if distributed else None
        # the pair exchange order: by stage, then layer name, identical on both holders
        self._pair_order = sorted(range(len(self.layers)), key=lambda i: _stage_key(self.layers[i].name))
        # the runtime's side_backward for the sampled Fisher (None for the empirical one)
        self.sampled_pass = SampledFisherPass(self) if self.options.sampled_fisher else None

    # ------------------------------------------------------------------ factors
    def step(self, optimizer: torch.optim.Optimizer | None = None, grad_scale: float = 1.0) -> None:
        """As :meth:`KFACPreconditioner.step`; the gradient accumulation's scale is divided out of ``G``.

        Args:
            optimizer: The optimizer about to step.
            grad_scale: The AMP loss scale of the recorded output gradients.
        """
        super().step(optimizer, grad_scale * self.accumulate_grad_batches)

    def _update_factors(self, step: int, grad_scale: float) -> None:
        if self.pair_group is not None and dist.get_world_size(self.pair_group) > 1:
            self._sum_pair_accumulators()
        super()._update_factors(step, grad_scale)

    def _sum_pair_accumulators(self) -> None:
        """Adds the raw hook sums of the two copies of every held stage (one all-reduce)."""
        if not self.layers:  # the pair partner holds the same stages: it has none either
            return
        start = self.clock()
        pieces: list[torch.Tensor] = []
        dtype, device = self.dtype, self.device
        counts = torch.zeros(4 * len(self.layers), dtype=torch.float64, device=device)
        for j, i in enumerate(self._pair_order):
            layer = self.layers[i]
            fired = layer.a_sum is not None and layer.g_sum is not None
            a = layer.a_sum if fired and layer.a_sum is not None else torch.zeros(layer.in_dim, layer.in_dim)
            g = (
                layer.g_sum
                if fired and layer.g_sum is not None
                else torch.zeros(layer.out_dim, layer.out_dim)
            )
            pieces += [
                a.to(dtype=dtype, device=device).reshape(-1),
                g.to(dtype=dtype, device=device).reshape(-1),
            ]
            if fired:
                counts[4 * j : 4 * j + 4] = torch.tensor(
                    [layer.a_rows, layer.examples, layer.examples_used, 1.0], dtype=torch.float64
                )
        flat = torch.cat(pieces)
        self.comm.bytes_communicated += (
            flat.numel() * flat.element_size() + counts.numel() * counts.element_size()
        )
        dist.all_reduce(flat, group=self.pair_group)
        dist.all_reduce(counts, group=self.pair_group)
        offset = 0
        for j, i in enumerate(self._pair_order):
            layer = self.layers[i]
            a_size, g_size = layer.in_dim**2, layer.out_dim**2
            a = flat[offset : offset + a_size].view(layer.in_dim, layer.in_dim)
            g = flat[offset + a_size : offset + a_size + g_size].view(layer.out_dim, layer.out_dim)
            offset += a_size + g_size
            rows, examples, used, holders = (float(v) for v in counts[4 * j : 4 * j + 4])
            if holders < 2:  # a copy whose hooks did not fire would bias the factors: keep them unset
                layer.reset_accumulators()
                continue
            layer.a_sum, layer.g_sum = a.clone(), g.clone()
            layer.a_rows, layer.examples, layer.examples_used = int(rows), int(examples), int(used)
        self.counters["communication_seconds"] += self.clock() - start

    # ------------------------------------------------------------------ KL-clip
    def _counts_for_kl(self, layer: Any) -> bool:
        # The two copies of a stage carry the same update: count the down replica's only.
        return bool(layer.name.startswith("replica0."))

    def _reduce_kl(self, total: float) -> float:
        # Every rank of the pipeline must use the single-device clip factor: sum over the whole pipeline.
        if self.pipeline_group is not None and dist.get_world_size(self.pipeline_group) > 1:
            summed = torch.tensor([total], dtype=torch.float64, device=self.device)
            dist.all_reduce(summed, group=self.pipeline_group)
            return float(summed)
        return total

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """As :meth:`KFACPreconditioner.state_dict`, with the layers of the whole pipeline (a collective)."""
        state = super().state_dict()
        if self.pipeline_group is not None and dist.get_world_size(self.pipeline_group) > 1:
            gathered: list[Any] = [None] * dist.get_world_size(self.pipeline_group)
            dist.all_gather_object(gathered, (state["layers"], state.get("fisher_rng")), group=self.pipeline_group)
            state["layers"] = {name: layer for part, _ in gathered for name, layer in part.items()}
            # only ranks holding a last stage draw, all alike: any of theirs is every rank's state
            state["fisher_rng"] = next((rng for _, rng in gathered if rng is not None), None)
        return state


def check_pipeline_options(options: KFACOptions, where: str, *, data_parallel_size: int = 1) -> None:
    """Refuses what K-FAC cannot do under a pipeline: the one place of these rules (``DPKFAC`` calls it
    at setup, before the pipeline exists, and the preconditioner when it is built).

    Args:
        options: The K-FAC options.
        where: The strategy named in the error, e.g. ``"ChimeraStrategy"``.
        data_parallel_size: Pipeline replicas (1 when not known yet).

    Raises:
        ValueError: On ``fisher_output`` with a sampled ``fisher`` (the prediction is the last
            stage's output), or ``assignment="dp"`` with several pipeline replicas (the two holders
            of a stage need the same layers locally).
    """
    if options.sampled_fisher and options.fisher_output is not None:
        raise ValueError(
            f"`fisher_output={options.fisher_output!r}` is not supported under {where}: the sampled Fisher's"
            " prediction is the last stage's output (what pipeline_loss receives); use fisher_output=None."
        )
    if data_parallel_size > 1 and options.assignment == "dp":
        raise ValueError(
            f"`assignment='dp'` with {data_parallel_size} data-parallel pipeline replicas is not supported under"
            f" {where}; use assignment='replicated' (or one pipeline replica)."
        )


def _nested(stage_modules: dict[tuple[int, int], nn.Module]) -> nn.ModuleDict:
    """``replica<r>.stage<s>`` containers for the held copies (names stay stable across ranks)."""
    replicas: dict[str, nn.ModuleDict] = {}
    for r, s in sorted(stage_modules):
        replicas.setdefault(f"replica{r}", nn.ModuleDict())[f"stage{s}"] = stage_modules[(r, s)]
    return nn.ModuleDict(replicas)


def _stage_key(name: str) -> tuple[int, str]:
    """``replica<r>.stage<s>.<rest>`` -> ``(s, rest)``."""
    _, stage, rest = name.split(".", 2)
    return int(stage.removeprefix("stage")), rest
