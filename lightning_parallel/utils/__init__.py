"""Small helpers shared by the engines (``pipeline/``, ``kfac/``, ...) and the strategies. Imports no Lightning."""

from lightning_parallel.utils.flat import flat_collective, flatten, unflatten

__all__ = ["flat_collective", "flatten", "unflatten"]
