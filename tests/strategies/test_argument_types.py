"""Python-API type errors of the pipeline strategies name the argument and its value."""

from __future__ import annotations

import pytest

from lightning_parallel.strategies import ChimeraStrategy, InterlockingBackpropStrategy


def test_chimera_stages_as_text_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"stages='2' must be a positive number of pipeline stages"):
        ChimeraStrategy(stages="2")  # type: ignore[arg-type]


def test_chimera_partition_entry_that_is_not_a_number_is_refused_naming_it() -> None:
    with pytest.raises(TypeError, match=r"partition=\[2, 'x'\] must list whole numbers of blocks per stage"):
        ChimeraStrategy(stages=2, partition=[2, "x"])  # type: ignore[list-item]


def test_chimera_fractional_partition_is_refused_not_truncated() -> None:
    with pytest.raises(TypeError, match=r"partition=\[2.5, 2\] must list whole numbers"):
        ChimeraStrategy(stages=2, partition=[2.5, 2])  # type: ignore[list-item]


def test_chimera_micro_batches_as_text_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"micro_batches='4' must be positive"):
        ChimeraStrategy(stages=2, micro_batches="4")  # type: ignore[arg-type]


def test_interlocking_partition_entry_that_is_not_a_number_is_refused_naming_it() -> None:
    with pytest.raises(TypeError, match=r"partition=\[1, 'x'\] must list whole numbers of blocks per stage"):
        InterlockingBackpropStrategy(k=1, stages=2, partition=[1, "x"])  # type: ignore[list-item]
