"""Hyperparameters that may change over optimizer steps.

A hyperparameter is either a constant, a callable ``step -> value`` or, so that it can be written
in YAML, a list of ``[first_step, value]`` pairs read as a piecewise-constant schedule: the value
of the last pair whose ``first_step`` is at most the current step (the first pair must start at
step 0). Steps count optimizer steps from 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import TypeAlias

Hyperparameter: TypeAlias = float | int | Sequence[Sequence[float]] | Callable[[int], float]


def check_schedule(name: str, value: Hyperparameter) -> None:
    """Checks the form of a schedule (not its values, which :func:`resolve` checks per step).

    Args:
        name: The argument's name, used in the error message.
        value: The schedule to check.

    Raises:
        ValueError: If a list schedule is empty, has a pair that is not ``[step, value]``, does
            not start at step 0 or has steps that do not increase.
        TypeError: If the value is none of the supported forms.
    """
    if isinstance(value, bool):
        raise TypeError(f"`{name}={value!r}` is a bool; pass a number, a callable or [[step, value], ...].")
    if isinstance(value, (int, float)) or callable(value):
        return
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(
            f"`{name}={value!r}` is not a schedule; pass a number, a callable `step -> value` or a list of"
            " [first_step, value] pairs such as [[0, 0.01], [100, 0.001]]."
        )
    if len(value) == 0:
        raise ValueError(
            f"`{name}=[]` is empty; pass at least one [first_step, value] pair such as [[0, 0.01]]."
        )
    steps = []
    for pair in value:
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(
                f"`{name}` has the entry {pair!r}; each entry must be a [first_step, value] pair such as [100, 0.001]."
            )
        steps.append(int(pair[0]))
    if steps[0] != 0:
        raise ValueError(
            f"`{name}` starts at step {steps[0]}; the first [first_step, value] pair must start at 0."
        )
    if any(b <= a for a, b in pairwise(steps)):
        raise ValueError(f"`{name}` has steps {steps}; the first steps of the pairs must strictly increase.")


def resolve(value: Hyperparameter, step: int) -> float:
    """The value of a schedule at an optimizer step.

    Args:
        value: A schedule accepted by :func:`check_schedule`.
        step: The optimizer step, counted from 0.

    Returns:
        The hyperparameter's value at ``step``.
    """
    if isinstance(value, (int, float)):
        return float(value)
    if callable(value):
        return float(value(step))
    current = float(value[0][1])
    for first_step, pair_value in value:
        if step >= int(first_step):
            current = float(pair_value)
    return current
