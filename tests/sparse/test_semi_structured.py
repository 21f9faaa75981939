"""2:4 masks on CPU; the semi-structured export refuses a CPU model with a clear error (the GPU path is untested)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_parallel.sparse.semi_structured import export_semi_structured, two_four_mask


def test_two_four_mask_keeps_the_two_largest_of_every_four() -> None:
    weight = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    mask = two_four_mask(weight)
    for row in range(6):
        for group in range(4):
            values = weight[row, 4 * group : 4 * group + 4].abs()
            expected = set(torch.argsort(values, descending=True)[:2].tolist())
            assert set(mask[row, 4 * group : 4 * group + 4].nonzero().squeeze(1).tolist()) == expected
    with pytest.raises(ValueError, match=r"input size is a multiple of 4; got \(3, 6\)"):
        two_four_mask(torch.randn(3, 6))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_export_refuses_cpu() -> None:
    with pytest.raises(RuntimeError, match=r"runs on CUDA GPUs only \(got device cpu\)"):
        export_semi_structured(nn.Sequential(nn.Linear(64, 32)))
