"""QuantizationPrecision: a single pattern given as a string is refused, not read as a list of characters."""

from __future__ import annotations

import pytest

from lightning_parallel.plugins import QuantizationPrecision


def test_ignore_modules_as_one_string_is_refused_naming_it() -> None:
    with pytest.raises(TypeError, match=r"ignore_modules='blocks\.0' must be a list of patterns, e\.g\. \['blocks\.0'\]"):
        QuantizationPrecision("qat-int8", ignore_modules="blocks.0")  # type: ignore[arg-type]


def test_ignore_modules_as_a_list_is_kept() -> None:
    assert QuantizationPrecision("qat-int8", ignore_modules=["blocks.0"]).ignore_modules == ["blocks.0"]
