"""QuantizationPrecision under a real Trainer on the CPU: conversion, checkpoints, optimizer swap, bnb modes."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_parallel.models import MLPClassifier, ResNetClassifier
from lightning_parallel.plugins import QuantizationPrecision
from lightning_parallel.plugins.quantization import find_plugin_state, load_quantized_checkpoint
from lightning_parallel.quantization import QATLinear, quantizer_state_dict
from tests.helpers.callbacks import LossRecorder


def _loader(seed: int = 0, n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4].argmax(dim=1)).long()
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _model(**kwargs: Any) -> MLPClassifier:
    torch.manual_seed(0)
    return MLPClassifier(in_features=16, hidden=(32,), num_classes=4, lr=1e-2, **kwargs)


def _trainer(plugin: QuantizationPrecision, max_steps: int, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        plugins=[plugin],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **kwargs,
    )


def test_constructor_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"mode='int3' is not supported; use one of \('qat-int8'"):
        QuantizationPrecision("int3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"optimizer='lion8bit' is not supported"):
        QuantizationPrecision(optimizer="lion8bit")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"mode=None and optimizer=None leave nothing to quantize"):
        QuantizationPrecision(None)
    with pytest.raises(ValueError, match=r"inner='64-true' is not a supported precision"):
        QuantizationPrecision(inner="64-true")
    with pytest.raises(ValueError, match=r"act_bits=12 is not supported"):
        QuantizationPrecision(act_bits=12)
    with pytest.raises(ValueError, match=r"group_size=0 must be a positive integer"):
        QuantizationPrecision("qat-int4", group_size=0)
    with pytest.raises(ValueError, match=r"module_bits\['head'\]=1 is not supported"):
        QuantizationPrecision(module_bits={"head": 1})
    with pytest.raises(ValueError, match=r"module_bits applies to the qat modes only, but mode='bnb-nf4'"):
        QuantizationPrecision("bnb-nf4", module_bits={"head": 4})
    with pytest.raises(ValueError, match=r"int8_threshold=-1.0 must be >= 0"):
        QuantizationPrecision("bnb-int8", int8_threshold=-1.0)


def test_missing_bitsandbytes_fails_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    for kwargs in ({"mode": "bnb-int8"}, {"mode": "bnb-nf4"}, {"mode": None, "optimizer": "adam8bit"}):
        with pytest.raises(ModuleNotFoundError, match=r'pip install "lightning-parallel\[quant\]"'):
            QuantizationPrecision(**kwargs)  # type: ignore[arg-type]
    QuantizationPrecision("qat-int4")  # the QAT modes need no bitsandbytes


def test_model_without_quantizable_layers_fails_clearly() -> None:
    class NoLayers(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(16))

    with pytest.raises(ValueError, match=r"model NoLayers has no .*Linear or Conv2d layer to quantize"):
        QuantizationPrecision().convert_module(NoLayers())


def test_qat_fit_checkpoint_reload_and_resume(tmp_path: Path) -> None:
    model = _model()
    trainer = _trainer(QuantizationPrecision("qat-int8", ignore_modules=["blocks.1"]), max_steps=6)
    trainer.fit(model, _loader())
    assert isinstance(model.blocks[0][1], QATLinear)
    assert type(model.blocks[1][0]) is torch.nn.Linear  # ignored head
    factor = model.blocks[0][1].weight_quantizer.factor
    assert not torch.equal(factor, torch.ones_like(factor)), "step sizes train"
    path = tmp_path / "qat.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    state = find_plugin_state(checkpoint)
    assert state is not None and state["settings"]["mode"] == "qat-int8"
    saved = quantizer_state_dict(model)
    assert set(state["quantizers"]) == set(saved)
    assert not any("quantizer" in key for key in checkpoint["state_dict"])

    x = torch.randn(8, 16)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    # plain load: the float model with the trained latent weights
    plain = MLPClassifier.load_from_checkpoint(path)
    assert type(plain.blocks[0][1]) is torch.nn.Linear
    torch.testing.assert_close(plain.blocks[0][1].weight, model.blocks[0][1].weight)
    # the helper rebuilds the QAT model: same outputs
    restored = load_quantized_checkpoint(MLPClassifier, str(path))
    restored.eval()
    assert isinstance(restored.blocks[0][1], QATLinear)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), expected)

    # resuming converts the fresh model and restores the step sizes before training continues
    seen: dict[str, torch.Tensor] = {}

    class Capture(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            seen.update(quantizer_state_dict(pl_module))

    resumed = _trainer(
        QuantizationPrecision("qat-int8", ignore_modules=["blocks.1"]), max_steps=8, callbacks=[Capture()]
    )
    resumed.fit(_model(), _loader(), ckpt_path=path)
    assert set(seen) == set(saved)
    for key, value in saved.items():
        torch.testing.assert_close(seen[key], value, msg=key)
    assert resumed.global_step == 8

    wrong = _trainer(QuantizationPrecision("qat-int4", ignore_modules=["blocks.1"]), max_steps=8)
    with pytest.raises(
        ValueError, match=r"written with QuantizationPrecision\(mode='qat-int8'\) but this plugin"
    ):
        wrong.fit(_model(), _loader(), ckpt_path=path)


def test_qat_int4_matches_manual_conversion_step() -> None:
    """One Trainer step equals one manual step of the same converted model (the plugin adds nothing else)."""
    data = next(iter(_loader()))
    model = _model(optimizer="sgd", momentum=0.0)
    trainer = _trainer(QuantizationPrecision("qat-int4", group_size=8), max_steps=1)
    reference = _model(optimizer="sgd", momentum=0.0)
    QuantizationPrecision("qat-int4", group_size=8).convert_module(reference)
    opt = torch.optim.SGD(reference.parameters(), lr=1e-2, momentum=0.0)
    loss = reference.pipeline_loss(reference(data[0]), data)
    loss.backward()
    opt.step()
    trainer.fit(model, DataLoader(TensorDataset(*data), batch_size=16))
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_adam8bit_swaps_optimizer_and_scheduler() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    model = MLPClassifier(in_features=16, hidden=(512,), num_classes=4, lr=1e-2, scheduler="cosine")
    trainer = _trainer(QuantizationPrecision(None, optimizer="adam8bit"), max_steps=4)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lr_scheduler.step.*")
        warnings.filterwarnings("error", message=".*optimizer.step.*")
        trainer.fit(model, _loader())
    opt = trainer.optimizers[0]
    assert type(opt) is bnb.optim.Adam8bit
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is opt
    # cosine over 4 steps: lr has decayed on the swapped optimizer
    assert opt.param_groups[0]["lr"] < 1e-2
    weight = model.blocks[0][1].weight  # 8,192 elements: 8-bit state
    assert opt.state[weight]["state1"].dtype == torch.uint8


@pytest.mark.parametrize("mode", ["bnb-int8", "bnb-nf4"])
def test_bnb_modes_train_on_cpu(mode: str) -> None:
    pytest.importorskip("bitsandbytes")
    model = _model()
    trainer = _trainer(QuantizationPrecision(mode), max_steps=4)  # type: ignore[arg-type]
    first = model.blocks[0][1]
    bias_before = first.bias.detach().clone()
    trainer.fit(model, _loader())
    layer = model.blocks[0][1]
    assert type(layer).__name__ in ("FrozenLinear8bit", "FrozenLinearNF4")
    assert not layer.weight.requires_grad
    assert layer.weight.element_size() == 1
    assert not torch.equal(layer.bias, bias_before), "the biases train"


def test_inner_bf16_mixed_autocasts_forward() -> None:
    flags: list[bool] = []

    class Probe(MLPClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            flags.append(torch.is_autocast_enabled("cpu"))
            return super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    model = Probe(in_features=16, hidden=(32,), num_classes=4)
    plugin = QuantizationPrecision("qat-int8", inner="bf16-mixed")
    assert plugin.precision == "bf16-mixed"
    _trainer(plugin, max_steps=2).fit(model, _loader())
    assert flags == [True, True]


def test_convert_module_is_idempotent_and_state_nests() -> None:
    plugin = QuantizationPrecision("qat-int8")
    model = _model()
    plugin.convert_module(model)
    layer = model.blocks[0][1]
    plugin.convert_module(model)
    assert model.blocks[0][1] is layer
    nested = {"SomeWrapperPrecision": {"inner": plugin.state_dict()}}
    found = find_plugin_state(nested)
    assert found is not None and found["settings"]["mode"] == "qat-int8"
    rebuilt = QuantizationPrecision.from_state_dict(found)
    assert rebuilt.settings() == plugin.settings()


def test_sanity_check_before_training_does_not_start_the_step_sizes() -> None:
    """Lightning validates before the first training step; in evaluation mode BatchNorm's initial running
    statistics shrink the activations, and step sizes started from them froze a whole ResNet. The run with
    the sanity check must equal the run without it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)

    def run(sanity_steps: int) -> list[float]:
        torch.manual_seed(0)
        model = ResNetClassifier(widths=(4, 8), lr=1e-2)
        losses = LossRecorder()
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=4,
            plugins=[QuantizationPrecision("qat-int8")],
            callbacks=[losses],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=sanity_steps,
            limit_val_batches=1,
        )
        trainer.fit(model, loader, loader)
        return losses.losses

    without = run(0)
    assert without[-1] < without[0]  # it learns
    assert run(2) == pytest.approx(without, abs=1e-6)
