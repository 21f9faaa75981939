"""Argument checks shared by the DataModules."""

from __future__ import annotations


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise ``ValueError`` unless both held-out fractions are in [0, 1) and leave training data."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name}={value} must be in [0, 1), e.g. 0.15.")
    if val_fraction + test_fraction >= 0.9:
        raise ValueError(
            f"val_fraction + test_fraction = {val_fraction} + {test_fraction} = {val_fraction + test_fraction:g} "
            "leaves too little training data; keep the sum below 0.9 (e.g. 0.15 + 0.15)."
        )


def check_batch_size(batch_size: int, available: int, split: str) -> None:
    """Raise ``ValueError`` unless ``1 <= batch_size <= available``."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    if batch_size > available:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {available} {split} examples; use batch_size <= {available}."
        )
