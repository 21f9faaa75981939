"""The layer registry: which modules are covered, coverage counts and warnings, user-registered types."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from lightning_parallel.layers import registry
from lightning_parallel.layers.registry import (
    LayerType,
    find_targets,
    linear_target,
    register_layer_type,
    unregister_layer_type,
    weight_coverage,
)
from lightning_parallel.quantization.convert import convert_to_qat, converted_coverage


@pytest.fixture
def restore_registry() -> Iterator[None]:
    saved = registry.layer_types()
    yield
    registry._REGISTRY[:] = saved


def _gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config)


def test_gpt2_is_covered_by_kfac_and_qat() -> None:
    model = _gpt2()
    targets = find_targets(model)
    kinds = {type(t.module).__name__ for t in targets}
    assert kinds == {"Conv1D", "Linear"}  # attention/MLP Conv1D and the tied lm_head
    assert len(targets) == 2 * 4 + 1
    coverage = weight_coverage(model, [t.weight for t in targets], "K-FAC")
    # by hand: blocks 2 x 12 E^2, the tied wte/lm_head V x E; left out: wpe (positions x E)
    e, v, p = 64, 96, 64
    assert coverage.covered_bytes == 4 * (2 * 12 * e * e + v * e)
    assert coverage.total_bytes == 4 * (2 * 12 * e * e + v * e + p * e)
    assert coverage.skipped == [("transformer.wpe.weight", 4 * p * e)]
    assert coverage.warning() is None
    convert_to_qat(model)
    assert converted_coverage(model, "QAT").covered_bytes == coverage.covered_bytes


def test_transformer_encoder_is_covered_through_its_attention() -> None:
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    model = nn.Sequential(
        nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False), nn.Linear(16, 3)
    )
    targets = find_targets(model)
    names = [t.name for t in targets]
    assert "0.layers.0.self_attn.in_proj.q" in names and "0.layers.1.self_attn.out_proj" in names
    coverage = weight_coverage(model, [t.weight for t in targets], "K-FAC")
    assert coverage.covered_count == coverage.total_count and coverage.fraction == 1.0


def test_less_than_half_covered_is_a_warning_naming_the_biggest_modules() -> None:
    model = nn.Sequential(nn.Embedding(1000, 32), nn.Linear(32, 4), nn.LayerNorm(4))
    coverage = weight_coverage(model, [t.weight for t in find_targets(model)], "K-FAC")
    assert (coverage.covered_count, coverage.total_count) == (1, 2)
    assert coverage.fraction == pytest.approx(128 / (32000 + 128))
    assert "K-FAC covers 1 of 2 weight parameters" in coverage.summary()
    message = coverage.warning()
    assert message is not None and "only 0.4%" in message and "0.weight (0.12 MiB)" in message
    info: list[str] = []
    warned: list[str] = []
    coverage.report(info.append, warned.append)
    assert info == [coverage.summary()] and warned == [message]


@pytest.mark.usefixtures("restore_registry")
def test_register_and_unregister_a_layer_type() -> None:
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 5))
            self.bias = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(x @ self.weight.t())

    model = nn.Sequential(Gate(), nn.Linear(3, 2))
    assert [t.name for t in find_targets(model)] == ["1"]
    register_layer_type(LayerType("Gate", lambda m: isinstance(m, Gate), lambda n, m: [linear_target(n, m)]))
    assert [t.name for t in find_targets(model)] == ["0", "1"]
    unregister_layer_type("Gate")
    assert [t.name for t in find_targets(model)] == ["1"]
    with pytest.raises(ValueError, match=r"name='Gate' is not a registered layer type"):
        unregister_layer_type("Gate")
