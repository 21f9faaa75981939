"""HFGPT2LanguageModel: a random Hugging Face GPT-2 as a plain LightningModule."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_parallel.models import HFGPT2LanguageModel


def test_logits_and_initial_loss() -> None:
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = HFGPT2LanguageModel(vocab_size=128, block_size=16, n_embd=32, n_layer=1, n_head=2)
    idx = torch.randint(0, 128, (3, 16))
    assert model(idx).shape == (3, 16, 128)
    # random init: close to the uniform distribution's cross-entropy
    assert abs(model._loss((idx, idx)).item() - math.log(128)) < 0.5


def test_bad_optimizer_names_the_argument() -> None:
    with pytest.raises(ValueError, match=r"optimizer='adam' is not supported; use 'adamw' or 'sgd'"):
        HFGPT2LanguageModel(optimizer="adam")  # type: ignore[arg-type]
