"""Pipeline strategies; importing this package registers their short names in Lightning's StrategyRegistry."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import StrategyRegistry


def _register(name: str, strategy: type, description: str, **init_params: Any) -> None:
    """Register ``name`` once (re-importing the package must not fail on a name taken by us before)."""
    if name not in StrategyRegistry:
        StrategyRegistry.register(name, strategy, description=description, **init_params)


__all__: list[str] = []
