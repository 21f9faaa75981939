"""Pipeline strategies; importing this package registers their short names in Lightning's StrategyRegistry."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import StrategyRegistry

from lightning_parallel.strategies.auxnet import AuxNetStrategy
from lightning_parallel.strategies.chimera import ChimeraStrategy
from lightning_parallel.strategies.interlocking import InterlockingBackpropStrategy


def _register(name: str, strategy: type, description: str, **init_params: Any) -> None:
    """Register ``name`` once (re-importing the package must not fail on a name taken by us before)."""
    if name not in StrategyRegistry:
        StrategyRegistry.register(name, strategy, description=description, **init_params)


_register("chimera", ChimeraStrategy, "Chimera bidirectional pipeline over all processes", schedule="chimera")
_register("pipeline_1f1b", ChimeraStrategy, "1F1B pipeline over all processes", schedule="1f1b")
_register("pipeline_gpipe", ChimeraStrategy, "GPipe pipeline over all processes", schedule="gpipe")

_register("interlocking", InterlockingBackpropStrategy, "Interlocking backprop (k-wise local losses), one stage per process")

_register("auxnet", AuxNetStrategy, "AuxNet forward-unlocked training (auxiliary networks, penalty / AL losses)")

__all__: list[str] = ["AuxNetStrategy", "ChimeraStrategy", "InterlockingBackpropStrategy"]
