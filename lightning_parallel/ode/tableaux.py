"""Butcher tableaux of the explicit Runge-Kutta methods (``euler``, ``rk4``, ``dopri5``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tableau:
    """An explicit Runge-Kutta method.

    Attributes:
        a: stage coefficients, row ``i`` holds ``a_ij`` for ``j < i``.
        b: weights of the solution.
        c: stage times as fractions of the step.
        b_error: ``b - b*`` of the embedded lower-order solution (empty when there is none), so that
            ``h * sum_i b_error_i k_i`` estimates the local error.
        order: the order that sets the step-size controller's exponent (the lower order of the pair).
    """

    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    c: tuple[float, ...]
    b_error: tuple[float, ...] = ()
    order: int = 1


EULER = Tableau(a=((),), b=(1.0,), c=(0.0,), order=1)
RK4 = Tableau(
    a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
    c=(0.0, 0.5, 0.5, 1.0),
    order=4,
)
_DOPRI5_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DOPRI5_B_STAR = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
DOPRI5 = Tableau(  # Dormand & Prince (1980), the 5(4) pair
    a=(
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
    ),
    b=_DOPRI5_B,
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    b_error=tuple(b - s for b, s in zip(_DOPRI5_B, _DOPRI5_B_STAR)),
    order=4,
)
TABLEAUX = {"euler": EULER, "rk4": RK4, "dopri5": DOPRI5}
