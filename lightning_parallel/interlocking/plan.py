"""Interlocking backprop: which loss updates which stage, and how the blocks are cut into stages.

Interlocking backpropagation (Gomez et al., JMLR 2022, arXiv 2010.04116) splits a network into ``S`` stages;
every stage but the last carries a small auxiliary head that predicts the task from the stage's output, and
its loss is the *head loss* of that stage. The last stage's "head" is the model's true loss
(``pipeline_loss``). With interlocking width ``k``:

- the parameters of stage ``j`` are updated by the loss of stage ``target(j) = min(j + k - 1, S - 1)`` only;
- that gradient flows back through stages ``j .. target(j)`` and no further: the input of stage ``j``'s
  window is detached;
- each auxiliary head is trained by its own loss only.

``k = 1`` is local learning (each stage trained by its own head, Decoupled Greedy Learning); ``k = S`` is
end-to-end backprop (every stage is updated by the true loss, through all later stages) and gives exactly the
parameters of end-to-end training.

Vocabulary used by the execution code:

- *target* ``t``: the stage whose loss (head loss, or the true loss for ``t = S - 1``) is differentiated.
- *users* of ``t``: the stages whose parameters ``t`` updates; *reach* of ``t``: the first of them. The
  gradient of target ``t`` passes through every stage ``s`` with ``reach(t) <= s <= t``.
- at stage ``s`` a target needs the *weight* gradient (``W``) when ``s`` is one of its users, and the *input*
  gradient (``I``, sent to stage ``s - 1``) when ``reach(t) < s``.

Design decisions:

- Stage ``j`` uses only the furthest loss (as the reference implementation does), not a sum of the losses in
  its window; so with ``k >= 2`` the first head's loss trains that head alone (kept for early exit).
- Blocks are cut into contiguous stages by :mod:`lightning_parallel.pipeline.partition`: by default equal
  counts with the leftover blocks to the outer stages first (``outer_first_partition``: last, then first,
  ...), because a trunk's first and last blocks (stem, pooling head) are usually its cheapest; the
  strategy's ``partition`` overrides this (``"uniform"``, ``"parameters"`` or explicit block counts).

This module imports no Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass


def check_width(k: int, stages: int) -> None:
    """Raise a ``ValueError`` unless ``1 <= k <= stages``.

    Args:
        k: the interlocking width.
        stages: the number of stages ``S``.
    """
    if stages < 1:
        raise ValueError(f"stages={stages} must be >= 1.")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= stages:
        raise ValueError(
            f"k={k!r} must be an integer with 1 <= k <= stages={stages}: k=1 is local learning, "
            f"k={stages} is end-to-end backprop."
        )


@dataclass(frozen=True)
class InterlockingPlan:
    """Which loss updates which stage for ``stages`` stages and width ``k``.

    Args:
        stages: the number of stages ``S`` (>= 1).
        k: the interlocking width, ``1 <= k <= S``.
    """

    stages: int
    k: int

    def __post_init__(self) -> None:
        check_width(self.k, self.stages)

    def target(self, stage: int) -> int:
        """The stage whose loss updates ``stage``'s parameters: ``min(stage + k - 1, S - 1)``."""
        return min(stage + self.k - 1, self.stages - 1)

    def users(self, target: int) -> list[int]:
        """The stages whose parameters are updated by ``target``'s loss (possibly none)."""
        return [j for j in range(self.stages) if self.target(j) == target]

    def reach(self, target: int) -> int | None:
        """The first stage that ``target``'s gradient reaches, or ``None`` if it updates no stage."""
        users = self.users(target)
        return users[0] if users else None

    def passes(self, stage: int) -> list[int]:
        """The targets whose gradient passes through ``stage``, ascending."""
        result = []
        for t in range(stage, self.stages):
            first = self.reach(t)
            if first is not None and first <= stage:
                result.append(t)
        return result

    def needs_weight(self, stage: int, target: int) -> bool:
        """Whether ``target``'s gradient updates ``stage``'s parameters."""
        return self.target(stage) == target

    def needs_input(self, stage: int, target: int) -> bool:
        """Whether ``target``'s gradient must continue to ``stage - 1``."""
        first = self.reach(target)
        return first is not None and first < stage <= target

    def received(self, stage: int) -> list[int]:
        """The targets whose gradient ``stage`` receives from ``stage + 1``, ascending."""
        return [t for t in self.passes(stage) if t > stage]

    def sent(self, stage: int) -> list[int]:
        """The targets whose input gradient ``stage`` sends to ``stage - 1``, ascending."""
        return [t for t in self.passes(stage) if self.needs_input(stage, t)]

    def sent_early(self, stage: int) -> list[int]:
        """The part of :meth:`sent` known right after the forward: ``stage``'s own loss, if it is sent."""
        return [t for t in self.sent(stage) if t == stage]

    def sent_late(self, stage: int) -> list[int]:
        """The part of :meth:`sent` relayed from later stages (known after ``stage``'s backward)."""
        return [t for t in self.sent(stage) if t > stage]

    def has_backward(self, stage: int) -> bool:
        """Whether ``stage`` waits for gradients from ``stage + 1``."""
        return bool(self.received(stage))

    def depth(self, stage: int) -> int:
        """How many stages ahead ``stage``'s backward depends on: ``max(received) - stage`` (0 if none)."""
        received = self.received(stage)
        return received[-1] - stage if received else 0


def stages_of_rank(rank: int, world_size: int, stages: int) -> list[int]:
    """The contiguous stages held by ``rank`` when ``stages`` stages are spread over ``world_size`` ranks.

    Raises:
        ValueError: if ``stages`` is not a multiple of ``world_size``.
    """
    if world_size < 1 or stages % world_size != 0:
        raise ValueError(
            f"stages={stages} must be a multiple of the world size ({world_size} processes) so that every rank "
            f"holds the same number of stages; use stages={world_size} (one per rank) or a multiple of it."
        )
    per_rank = stages // world_size
    return list(range(rank * per_rank, (rank + 1) * per_rank))
