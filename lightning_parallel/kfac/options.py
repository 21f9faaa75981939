"""K-FAC hyperparameters, validated once, resolved per optimizer step."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from lightning_parallel.kfac.hyperparams import Hyperparameter, check_schedule, resolve

Assignment = Literal["dp", "replicated"]
ASSIGNMENTS = ("dp", "replicated")
Placement = Literal["auto", "owner", "all"]
PLACEMENTS = ("auto", "owner", "all")
METHODS = ("eigen", "inverse")
FISHERS = ("empirical", "gaussian", "categorical")
# "empirical", "gaussian", "categorical", or ``output -> loss`` on targets sampled from the model
Fisher = str | Callable[[torch.Tensor], torch.Tensor]


@dataclass
class KFACOptions:
    """Hyperparameters of K-FAC; each numeric one may be a schedule (see ``hyperparams.py``).

    Args:
        damping: Tikhonov damping ``lambda`` (> 0); the factors get ``pi sqrt(lambda)`` and
            ``sqrt(lambda) / pi``. Default 0.001.
        factor_decay: Weight of the old running average of the factors, in ``[0, 1)``. Default 0.95.
        kl_clip: KL-clip bound (> 0) on ``lr^2 <preconditioned, gradient>``, or ``None`` for no
            clipping. Default 0.001.
        factor_update_steps: Optimizer steps between factor updates (integer >= 1). Default 1.
        inv_update_steps: Optimizer steps between decompositions (integer >= 1). Default 10.
        assignment: ``"dp"`` (DP-KFAC: each layer has one owner rank, which alone records, builds
            and decomposes its factors; no factor communication) or ``"replicated"`` (D-KFAC: factors
            all-reduced, every rank decomposes and preconditions every layer). Default ``"dp"``.
        placement: Where a ``dp`` layer's decomposition is used. ``"owner"``: the owner preconditions
            and broadcasts the preconditioned gradient on every step (least memory). ``"all"``: the
            owner broadcasts the decomposition each time it changes (every ``inv_update_steps``) and
            every rank preconditions every layer locally, with no per-step traffic (every rank holds
            every decomposition). ``"auto"`` (default): the one with fewer bytes per step for the
            intervals at the first step, by the cost model of ``assignment.placement_costs``; the
            choice is logged. Under ``"replicated"`` every rank preconditions: ``"auto"`` or ``"all"``.
        method: ``"eigen"`` (eigendecomposition) or ``"inverse"`` (damped inverses). Default ``"eigen"``.
        factored_damping: Split the damping between the factors by
            ``pi = sqrt((tr A / dim A) / (tr G / dim G))`` (``pi = 1`` if off). Default ``True``.
        factor_subsample: Build the factor statistics from every ``factor_subsample``-th example of
            each forward call (the rows of the others are not touched; ``G`` is rescaled to the whole
            batch). 1 (default) uses every example; 2-4 make factor steps cheaper on large batches.
        position_subsample: Build the factor statistics from every ``position_subsample``-th sequence
            position (dimension 1 of a Linear input with more than two dimensions) or output row (a
            Conv2d); ``G`` is rescaled to all positions. Layers with one position per example (2-D
            inputs) use every row; one warning counts them. For a sequence-first input (``(T, n, ...)``,
            e.g. ``batch_first=False`` attention) dimension 1 is the batch: still a uniform subsample
            of the rows. 1 (default) uses every position.
        factor_rank: With ``method="eigen"``, keep only the ``factor_rank`` largest eigenpairs of a
            factor wider than that; the rest of its spectrum is taken as 0, so those directions get
            the damping alone. Preconditioning a layer then costs ``2 out in k`` multiply-adds on the
            ``A`` side instead of ``out in^2``. ``None`` (default) keeps every eigenpair (exact K-FAC).
        stagger_decompositions: Spread the layers' decompositions over the ``inv_update_steps``
            steps of an interval (balanced by their ``in^3 + out^3`` cost, the same greedy as the
            owners; with at least as many steps as layers, one layer per step), so no step pays for
            all of them and, under ``dp``, no owner holds the others up; every layer still decomposes
            once per interval, and all at step 0. Default ``False`` (all on multiples of the interval).
        skip_layers: Regular expressions; a layer whose qualified name or class name matches one
            (``re.search``) is left to the optimizer. Default none.
        fisher: Where ``G`` comes from. ``"empirical"``: the gradients of the training loss.
            ``"gaussian"`` / ``"categorical"`` (the true Fisher, sampled): on factor-update steps an
            extra backward pass of the negative log-likelihood of targets sampled from the model's
            predictive distribution, ``output + N(0, I)`` (regression; the Gauss-Newton matrix of
            ``0.5 * ||output - y||^2``) or ``softmax(output)`` over the last dimension
            (classification). A callable ``output -> loss`` samples its own targets and returns the
            negative log-likelihood summed over the examples (``reduction="sum"``), so that its
            gradient is each example's own. Default ``"empirical"``; a sampled one is not supported
            under pipeline strategies (``kfac.pipeline.check_pipeline_options``).
        fisher_output: Qualified name of the module whose output is the model's prediction (used
            by the sampled Fisher); ``None`` (default): the last preconditioned layer.
        fisher_seed: Seed of the sampled Fisher's random generator (offset by the rank). Default 0.

    Raises:
        ValueError: On non-positive damping or KL-clip, update intervals below 1, a ``factor_decay``
            outside ``[0, 1)``, an unknown assignment, placement, method or ``fisher``, a bad
            schedule or ``skip_layers`` pattern, ``placement="owner"`` with ``"replicated"``, a subsample
            or ``factor_rank`` below 1, or ``factor_rank`` with ``method="inverse"``.
        TypeError: On a hyperparameter that is neither a number, a callable nor a list of pairs.
    """

    damping: Hyperparameter = 0.001
    factor_decay: Hyperparameter = 0.95
    kl_clip: Hyperparameter | None = 0.001
    factor_update_steps: Hyperparameter = 1
    inv_update_steps: Hyperparameter = 10
    assignment: Assignment = "dp"
    placement: Placement = "auto"
    method: Literal["eigen", "inverse"] = "eigen"
    factored_damping: bool = True
    factor_subsample: int = 1
    position_subsample: int = 1
    factor_rank: int | None = None
    stagger_decompositions: bool = False
    skip_layers: Sequence[str] = field(default_factory=tuple)
    fisher: Fisher = "empirical"
    fisher_output: str | None = None
    fisher_seed: int = 0

    def __post_init__(self) -> None:
        if not callable(self.fisher) and self.fisher not in FISHERS:
            raise ValueError(
                f"`fisher={self.fisher!r}` is unknown; use 'empirical' (gradients of the training loss),"
                " 'gaussian' (sampled Fisher of a regression output), 'categorical' (sampled Fisher of"
                " logits) or a callable `output -> loss` on sampled targets."
            )
        if self.assignment not in ASSIGNMENTS:
            raise ValueError(
                f"`assignment={self.assignment!r}` is unknown; use 'dp' (one owner per layer, broadcast of the"
                " preconditioned gradient) or 'replicated' (factors all-reduced, every rank preconditions every layer)."
            )
        if self.placement not in PLACEMENTS:
            raise ValueError(
                f"`placement={self.placement!r}` is unknown; use 'owner' (the owner broadcasts the preconditioned"
                " gradient every step), 'all' (the owner broadcasts the decomposition when it changes, every rank"
                " preconditions) or 'auto' (the cheaper of the two in bytes per step)."
            )
        if self.placement == "owner" and self.assignment == "replicated":
            raise ValueError(
                "`placement='owner'` with `assignment='replicated'`: replicated K-FAC preconditions every layer on"
                " every rank; use placement='auto' (or 'all'), or assignment='dp' for owner placement."
            )
        for name in ("factor_subsample", "position_subsample", "factor_rank"):
            value = getattr(self, name)
            if value is None and name == "factor_rank":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"`{name}={value!r}` must be an integer >= 1, for example 2.")
            if value < 1:
                hint = "eigenpairs kept per factor" if name == "factor_rank" else "1 uses every one, 2 every second"
                raise ValueError(f"`{name}={value}` must be >= 1 ({hint}).")
        if self.factor_rank is not None and self.method != "eigen":
            raise ValueError(
                f"`factor_rank={self.factor_rank}` with `method={self.method!r}`: truncated eigenbases need"
                " method='eigen'; use method='eigen' or factor_rank=None."
            )
        if self.method not in METHODS:
            raise ValueError(f"`method={self.method!r}` is unknown; use 'eigen' or 'inverse'.")
        if isinstance(self.skip_layers, str):
            self.skip_layers = (self.skip_layers,)
        for pattern in self.skip_layers:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(
                    f"`skip_layers` has the pattern {pattern!r}, not a regular expression: {err}."
                ) from err
        for name in ("damping", "factor_decay", "kl_clip", "factor_update_steps", "inv_update_steps"):
            value = getattr(self, name)
            if value is None and name == "kl_clip":
                continue
            check_schedule(name, value)
            if not callable(value):
                points = [value] if isinstance(value, (int, float)) else [pair[1] for pair in value]
                for point in points:
                    self._check_value(name, float(point))

    @staticmethod
    def _check_value(name: str, value: float) -> None:
        if name in ("damping", "kl_clip") and not value > 0:
            raise ValueError(
                f"`{name}={value}` must be > 0 (for example 0.001); K-FAC needs positive {name}."
            )
        if name == "factor_decay" and not 0 <= value < 1:
            raise ValueError(f"`factor_decay={value}` must be in [0, 1), for example 0.95.")
        if name in ("factor_update_steps", "inv_update_steps") and (value < 1 or value != int(value)):
            raise ValueError(f"`{name}={value}` must be an integer >= 1 (1 updates every optimizer step).")

    @staticmethod
    def args_doc(indent: int) -> str:
        """The ``Args:`` entries of this class's docstring, re-indented: the one documentation of the
        options, which the ``DPKFAC`` callback's docstring embeds.

        Args:
            indent: Spaces before each entry's name.

        Returns:
            The entries, one option per entry, without the ``Args:`` header.
        """
        doc = KFACOptions.__doc__ or ""
        body = doc.split("Args:\n", 1)[1].split("\n\n", 1)[0]
        lines = body.splitlines()
        strip = len(lines[0]) - len(lines[0].lstrip())
        return "\n".join(" " * indent + line[strip:] if line.strip() else "" for line in lines).lstrip()

    @property
    def sampled_fisher(self) -> bool:
        """Whether ``G`` comes from a backward pass on sampled targets (not the training loss)."""
        return self.fisher != "empirical"

    def at(self, name: str, step: int) -> float:
        """A hyperparameter's value at an optimizer step, checked.

        Args:
            name: The option's name, e.g. ``"damping"``.
            step: The optimizer step, from 0.

        Returns:
            The value.
        """
        schedule: Hyperparameter | Callable[[int], float] = getattr(self, name)
        value = resolve(schedule, step)
        self._check_value(name, value)
        return value

    def is_update_step(self, name: str, step: int) -> bool:
        """Whether ``step`` is a multiple of the interval ``name`` (factor or inverse updates).

        Args:
            name: ``"factor_update_steps"`` or ``"inv_update_steps"``.
            step: The optimizer step, from 0.

        Returns:
            ``True`` on update steps.
        """
        return step % int(self.at(name, step)) == 0
