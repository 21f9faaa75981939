"""How the K-FAC hooks treat a layer called several times per forward (implicit and ODE blocks).

A deep-equilibrium layer or an ODE block calls the same Linear/Conv2d layer once per solver
iteration, stage or time step. Those calls are the same examples at different "depths", so they
follow the rule for sequence positions (shared weights, KFC): every call adds its rows to ``A`` and
its output gradients to ``G``, but the batch's examples are counted once. Without a scope each call
counts its examples, which is right for micro-batches (different examples) and ``calls`` times too
many for shared weights.

Solvers also evaluate the layer for Jacobian products only (Newton steps, adjoint linear solves);
those evaluations are not part of the model's gradient and are not recorded at all.

Both are plain module-level state (not thread-local): autograd may run tensor hooks on its own
threads, and a scope opened by the caller must hold there too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_paused = 0
_scope: object | None = None


@contextmanager
def shared_weights() -> Iterator[None]:
    """Inside, a layer called several times counts its batch's examples once (nested scopes join the outer one)."""
    global _scope
    if _scope is not None:
        yield
        return
    _scope = object()
    try:
        yield
    finally:
        _scope = None


@contextmanager
def not_recorded() -> Iterator[None]:
    """Inside, forward calls add nothing to the factors, and neither will the gradients of their outputs."""
    global _paused
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1


def is_paused() -> bool:
    """Whether a :func:`not_recorded` block is open."""
    return _paused > 0


def current_scope() -> object | None:
    """The open :func:`shared_weights` scope, or ``None``."""
    return _scope
