"""Workers of the preemption tests' process groups (a module that imports no Lightning, so workers start fast)."""

from __future__ import annotations

import signal

from lightning_parallel.preemption import SignalFlag


def late_agreement(rank: int, world_size: int) -> list[int | None]:
    """Four ``agreed_late`` calls; rank 1 notes SIGTERM before the second."""
    flag = SignalFlag()
    answers = []
    for call in range(4):
        if rank == 1 and call == 1:
            flag.received = int(signal.SIGTERM)  # what the handler does
        answers.append(flag.agreed_late())
    flag.settle()
    return answers
