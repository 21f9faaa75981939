"""Per-layer densities for a global sparsity: uniform, or Erdos-Renyi-Kernel (ERK).

ERK follows google-research/rigl ``sparse_utils.get_sparsities``: a layer's raw density is proportional to
``sum(shape) / prod(shape)`` (for a Conv2d ``(n_out, n_in, k_h, k_w)`` that is
``(n_out + n_in + k_h + k_w) / (n_out * n_in * k_h * k_w)``, ER drops the kernel terms), scaled by one ``eps``
so that the total number of nonzeros equals the uniform budget ``density * total``. A layer whose scaled
density would exceed 1 is made dense and ``eps`` is solved again over the others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"`density={density}` must be in (0, 1]: density = 1 - sparsity.")


def uniform_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """Every layer gets the same density.

    Args:
        shapes: weight shape per layer name.
        density: fraction of weights kept, in (0, 1].
    """
    _check_density(density)
    return dict.fromkeys(shapes, density)


def erk_densities(
    shapes: Mapping[str, Sequence[int]], density: float, *, kernel: bool = True, power_scale: float = 1.0
) -> dict[str, float]:
    """Erdos-Renyi(-Kernel) densities whose nonzeros add up to ``density`` times all weights.

    Args:
        shapes: weight shape per layer name (``(out, in)`` or ``(out, in, k_h, k_w)``).
        density: global fraction of weights kept, in (0, 1].
        kernel: ``True`` for ERK (kernel dimensions count in the raw density), ``False`` for ER.
        power_scale: exponent on the raw density (rigl's ``erk_power_scale``). Default 1.0.
    """
    _check_density(density)
    raw: dict[str, float] = {}
    for name, shape in shapes.items():
        dims = list(shape) if kernel else list(shape[:2])
        raw[name] = (sum(dims) / math.prod(dims)) ** power_scale
    dense: set[str] = set()
    while True:
        budget = 0.0  # nonzeros left for the sparse layers
        divisor = 0.0
        for name, shape in shapes.items():
            n = math.prod(shape)
            if name in dense:
                budget -= n * (1.0 - density)
            else:
                budget += n * density
                divisor += raw[name] * n
        if divisor == 0.0:
            return dict.fromkeys(shapes, 1.0)
        eps = budget / divisor
        sparse_raw = [raw[name] for name in shapes if name not in dense]
        highest = max(sparse_raw)
        if highest * eps <= 1.0:
            return {name: 1.0 if name in dense else eps * raw[name] for name in shapes}
        dense.update(name for name in shapes if name not in dense and raw[name] == highest)
