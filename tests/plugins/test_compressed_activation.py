"""CompressedActivationPrecision in a Trainer: exactness, delegation, logging, checkpoints, bad input."""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import Precision

from lightning_parallel.data import DigitsDataModule
from lightning_parallel.models import MLPClassifier
from lightning_parallel.plugins import CompressedActivationPrecision


def _fit(plugin: Precision | None, steps: int = 3, **trainer_kwargs: Any) -> tuple[pl.Trainer, MLPClassifier]:
    pl.seed_everything(0, verbose=False)
    model = MLPClassifier(hidden=(128, 128))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        plugins=[plugin] if plugin is not None else None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **trainer_kwargs,
    )
    trainer.fit(model, DigitsDataModule(batch_size=64, image_size=8))
    return trainer, model


def _params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_passthrough_trains_bitwise_like_no_plugin() -> None:
    _, plain = _fit(None)
    trainer, wrapped = _fit(CompressedActivationPrecision(codec="none"))
    assert torch.equal(_params(plain), _params(wrapped))
    assert trainer.callback_metrics["compression/compression_ratio"] == 1.0


@pytest.mark.parametrize(
    ("kwargs", "min_ratio"),
    [
        ({"codec": "kbit", "bits": 2}, 8.0),
        ({"codec": "error_bounded", "adaptive": True, "adapt_interval": 2}, 3.0),
    ],
)
def test_lossy_codecs_train_close_and_log(kwargs: dict[str, Any], min_ratio: float) -> None:
    _, plain = _fit(None, steps=5)
    plugin = CompressedActivationPrecision(min_numel=256, **kwargs)
    trainer, model = _fit(plugin, steps=5)
    metrics = trainer.callback_metrics
    assert float(metrics["compression/compression_ratio"]) == pytest.approx(
        plugin.last_stats.compression_ratio
    )
    assert plugin.last_stats.compression_ratio > min_ratio
    assert float(metrics["compression/peak_saved_bytes"]) < float(metrics["compression/raw_saved_bytes"])
    pl.seed_everything(0, verbose=False)
    init = _params(MLPClassifier(hidden=(128, 128)))
    # the training updates with and without compression point the same way
    cos = torch.nn.functional.cosine_similarity(_params(model) - init, _params(plain) - init, dim=0)
    assert cos > 0.9


class _Recording(Precision):
    """A precision that records which of its hooks ran."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        self.calls.append("convert_module")
        return module

    def forward_context(self) -> contextlib.AbstractContextManager:
        self.calls.append("forward_context")
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def train_step_context(self) -> Generator[None, None, None]:
        self.calls.append("train_step_context")
        yield

    def optimizer_step(self, optimizer: Any, model: Any, closure: Any, **kwargs: Any) -> Any:
        self.calls.append("optimizer_step")
        return super().optimizer_step(optimizer, model, closure, **kwargs)

    def clip_grad_by_norm(self, optimizer: Any, clip_val: int | float) -> None:
        self.calls.append("clip_grad_by_norm")
        super().clip_grad_by_norm(optimizer, clip_val)

    def state_dict(self) -> dict[str, Any]:
        return {"recorded": len(self.calls)}


def test_delegates_to_any_inner_precision_and_mixed_precision() -> None:
    inner = _Recording()
    plugin = CompressedActivationPrecision(inner)
    _fit(plugin, steps=2, gradient_clip_val=1.0)
    assert {"convert_module", "train_step_context", "optimizer_step", "clip_grad_by_norm"} <= set(inner.calls)
    assert plugin.state_dict()["inner"] == {"recorded": len(inner.calls)}
    assert CompressedActivationPrecision("16-mixed").scaler is not None
    bf16 = CompressedActivationPrecision("bf16-mixed")
    assert bf16.precision == "bf16-mixed"
    trainer, _ = _fit(bf16, steps=2)
    assert bf16.last_stats.tensors > 0 and torch.isfinite(trainer.callback_metrics["train_loss"])


def test_adaptive_state_goes_into_the_checkpoint(tmp_path: Path) -> None:
    plugin = CompressedActivationPrecision(
        codec="error_bounded", adaptive=True, adapt_interval=2, min_numel=256
    )
    trainer, _ = _fit(plugin, steps=3)
    assert plugin.controller is not None and plugin.controller.step == 3 and plugin.controller.bounds
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["CompressedActivationPrecision"]["controller"]
    assert saved == plugin.controller.state_dict()
    resumed = CompressedActivationPrecision(
        codec="error_bounded", adaptive=True, adapt_interval=2, min_numel=256
    )
    pl.seed_everything(0, verbose=False)
    trainer2 = pl.Trainer(
        accelerator="cpu",
        max_steps=4,
        plugins=[resumed],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer2.fit(
        MLPClassifier(hidden=(128, 128)), DigitsDataModule(batch_size=64, image_size=8), ckpt_path=path
    )
    assert resumed.controller is not None and resumed.controller.step == 4


def test_bad_arguments() -> None:
    with pytest.raises(
        ValueError, match=r"`codec` must be one of \('error_bounded', 'kbit', 'none'\), got codec='zip'"
    ):
        CompressedActivationPrecision(codec="zip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`bits` must be one of \(1, 2, 4, 8\), got bits=3"):
        CompressedActivationPrecision(bits=3)
    with pytest.raises(ValueError, match="`error_bound` must be a finite number > 0, got error_bound=0"):
        CompressedActivationPrecision(codec="error_bounded", error_bound=0)
    with pytest.raises(
        ValueError, match=r"inner='64-true' is not a supported precision; use one of \('32-true', 'bf16-mixed'"
    ):
        CompressedActivationPrecision("64-true")
    with pytest.raises(ValueError, match="`adaptive=True` needs codec='error_bounded', got codec='kbit'"):
        CompressedActivationPrecision(adaptive=True)


def test_wraps_quantization_precision_without_compressing_weights() -> None:
    from lightning_parallel.plugins import QuantizationPrecision

    plugin = CompressedActivationPrecision(QuantizationPrecision("qat-int8"), codec="kbit", min_numel=256)
    encoded: list[int] = []
    codec = plugin.compressor.codec
    original = codec.encode

    def spy(x: torch.Tensor, *, error_bound: float | None = None) -> Any:
        encoded.append(x.numel())
        return original(x, error_bound=error_bound)

    codec.encode = spy  # type: ignore[method-assign]
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        plugins=[plugin],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(MLPClassifier(hidden=(128, 128)), DigitsDataModule(batch_size=32, image_size=8))
    # activations: 32 x 64, 32 x 128, logits 32 x 10; never the weights (fake-quantized copies
    # included): 128 x 64, 128 x 128, 10 x 128
    assert encoded and set(encoded) <= {32 * 64, 32 * 128, 32 * 10}
    assert plugin.last_stats.compression_ratio > 8


def test_adaptive_calibration_sees_the_attention_in_a_trainer() -> None:
    from lightning_parallel.data import TextDataModule
    from lightning_parallel.models import GPTLanguageModel

    pl.seed_everything(0, verbose=False)
    plugin = CompressedActivationPrecision(codec="error_bounded", adaptive=True, adapt_interval=1, min_numel=256)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=2, plugins=[plugin], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    model = GPTLanguageModel(n_layer=1, n_head=2, n_embd=32)
    trainer.fit(model, TextDataModule(block_size=16, batch_size=8, max_chars=20_000))
    controller = plugin.controller
    assert controller is not None and controller.bounds
    # query, key, value and output of the one attention layer; none of them takes a formula bound
    assert len(controller._attention_slots) == 4
    assert not controller._attention_slots & set(controller.bounds)
