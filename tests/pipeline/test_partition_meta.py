"""Partitioning before any weight exists: ``"parameters"`` on a meta module, ``"flops"`` against formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_parallel.models import GPTLanguageModel
from lightning_parallel.pipeline.partition import (
    balanced_partition,
    flop_counts,
    parameter_counts,
    partition_blocks,
)


def _gpt_block_flops(batch: int, tokens: int, width: int, heads: int) -> int:
    """Forward + backward of one transformer block: 3 x (24 C^2 per token + the two attention products)."""
    projections = 24 * width * width * batch * tokens  # qkv 6C^2, proj 2C^2, MLP 16C^2 (2 flops per MAC)
    attention = 2 * 2 * batch * heads * tokens * tokens * (width // heads)  # Q K^T and A V
    return 3 * (projections + attention)


def test_flops_of_linear_layers_match_the_formula() -> None:
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    forward = 2 * 5 * (8 * 16 + 16 * 4)
    assert flop_counts([mlp], torch.zeros(5, 8), backward=False) == [forward]
    # Backward: a weight gradient and an input gradient per product, each as costly as the forward one.
    assert flop_counts([mlp], torch.zeros(5, 8)) == [3 * forward]


def test_flops_of_a_meta_gpt_match_the_formula_and_drive_the_partition() -> None:
    with torch.device("meta"):
        model = GPTLanguageModel(n_layer=4, n_head=4, n_embd=64, block_size=32)
    blocks = list(model.pipeline_blocks())
    sample = torch.zeros(2, 32, dtype=torch.long, device="meta")
    counts = flop_counts(blocks, sample)
    block = _gpt_block_flops(2, 32, 64, 4)
    head = 3 * 2 * 2 * 32 * 64 * 128
    assert counts == [0, block, block, block, block, head]
    sizes = partition_blocks(blocks, 3, "flops", sample_input=sample)
    assert sizes == balanced_partition([float(c) for c in counts], 3)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_flops_leave_a_materialised_block_untouched() -> None:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    before = [t.clone() for t in block.state_dict().values()]
    flop_counts([block], torch.randn(3, 4))
    assert all(p.grad is None for p in block.parameters())
    for old, new in zip(before, block.state_dict().values()):
        assert new.device.type == "cpu"
        torch.testing.assert_close(old, new)


def test_flops_work_on_a_torch_transformer_layer() -> None:
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    (count,) = flop_counts([layer], torch.zeros(2, 10, 32), backward=False)
    projections = 2 * 2 * 10 * (32 * 96 + 32 * 32 + 2 * 32 * 64)
    attention = 2 * 2 * 2 * 4 * 10 * 10 * 8
    assert count == projections + attention


def test_parameters_partition_is_the_same_on_meta_and_materialised_modules() -> None:
    torch.manual_seed(0)
    kwargs = {"n_layer": 5, "n_head": 2, "n_embd": 32, "block_size": 16}
    real = list(GPTLanguageModel(**kwargs).pipeline_blocks())
    with torch.device("meta"):
        meta = list(GPTLanguageModel(**kwargs).pipeline_blocks())
    assert parameter_counts(meta) == parameter_counts(real)
    for stages in (2, 3, 4):
        assert partition_blocks(meta, stages, "parameters") == partition_blocks(real, stages, "parameters")


def test_flops_without_a_sample_is_refused() -> None:
    with pytest.raises(ValueError, match="partition='flops' needs sample_input"):
        partition_blocks([nn.Linear(2, 2), nn.Linear(2, 2)], 2, "flops")
