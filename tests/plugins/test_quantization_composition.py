"""QuantizationPrecision as the inner precision of CompressedActivationPrecision, and hook forwarding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_parallel.models import MLPClassifier
from lightning_parallel.plugins import CompressedActivationPrecision, QuantizationPrecision
from lightning_parallel.plugins.quantization import find_plugin_state, load_quantized_checkpoint
from lightning_parallel.quantization import QATLinear, quantizer_state_dict


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    return DataLoader(TensorDataset(x, x[:, :4].argmax(dim=1)), batch_size=16)


def _trainer(plugin: Any, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        plugins=[plugin],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **kwargs,
    )


def test_inside_compressed_activation_precision(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLPClassifier(in_features=16, hidden=(32,), num_classes=4, lr=1e-2)
    inner = QuantizationPrecision("qat-int8")
    trainer = _trainer(CompressedActivationPrecision(inner=inner, codec="none"), max_steps=3)
    trainer.fit(model, _loader())
    assert isinstance(model.blocks[0][1], QATLinear)
    path = tmp_path / "wrapped.ckpt"
    trainer.save_checkpoint(path)
    state = find_plugin_state(torch.load(path, weights_only=False))
    assert state is not None, "the wrapper keeps the quantization state in its checkpoint entry"
    saved = quantizer_state_dict(model)
    assert set(state["quantizers"]) == set(saved)
    restored = load_quantized_checkpoint(MLPClassifier, str(path))
    for key, value in quantizer_state_dict(restored).items():
        torch.testing.assert_close(value, saved[key], msg=key)


def test_gradient_clipping_reaches_the_inner_precision() -> None:
    calls: list[float] = []
    plugin = QuantizationPrecision("qat-int8")
    original = plugin.inner.clip_grad_by_norm

    def spy(optimizer: Any, clip_val: float) -> None:
        calls.append(clip_val)
        original(optimizer, clip_val)

    plugin.inner.clip_grad_by_norm = spy  # type: ignore[method-assign]
    torch.manual_seed(0)
    model = MLPClassifier(in_features=16, hidden=(32,), num_classes=4, lr=1e-2)
    _trainer(plugin, max_steps=2, gradient_clip_val=0.5).fit(model, _loader())
    assert calls == [0.5, 0.5]


def test_strategy_that_skips_convert_module_still_gets_a_converted_model() -> None:
    plugin = QuantizationPrecision("qat-int8")
    torch.manual_seed(0)
    model = MLPClassifier(in_features=16, hidden=(32,), num_classes=4)
    plugin.connect(model, [], [])
    assert isinstance(model.blocks[0][1], QATLinear)
