"""Example models: the pipeline protocol agrees with the plain forward, training lowers the loss, bad input fails."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_parallel.data import DigitsDataModule, SyntheticDataModule
from lightning_parallel.models import GPTLanguageModel, MLPClassifier, ResNetClassifier
from lightning_parallel.pipeline.micro_batches import split_micro_batches
from lightning_parallel.pipeline.protocol import check_pipeline_protocol, run_blocks


def _models() -> list[tuple[pl.LightningModule, tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    images = torch.randn(8, 1, 8, 8)
    labels = torch.randint(0, 10, (8,))
    tokens = torch.randint(0, 128, (4, 16))
    return [
        (MLPClassifier(hidden=(32, 32)), (images, labels)),
        (ResNetClassifier(widths=(4, 8), norm="group"), (images, labels)),
        (GPTLanguageModel(n_layer=2, n_head=2, n_embd=16, block_size=16), (tokens, tokens.roll(-1, dims=1))),
    ]


@pytest.mark.parametrize("index", range(3), ids=["mlp", "resnet", "gpt"])
def test_protocol_matches_dense_loss(index: int) -> None:
    model, batch = _models()[index]
    check_pipeline_protocol(model, who="test")
    out = run_blocks(model.pipeline_blocks(), model.pipeline_input(batch))
    logits = model(batch[0])
    reference = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))
    torch.testing.assert_close(model.pipeline_loss(out, batch), reference)
    # Mean loss over equal micro-batches equals the full-batch loss: what pipeline strategies rely on.
    micro = split_micro_batches(batch, 2)
    micro_losses = [model.pipeline_loss(model(m[0]), m) for m in micro]
    torch.testing.assert_close(torch.stack(micro_losses).mean(), reference)
    assert set(model.pipeline_metrics(out, batch)) == {"loss", "acc"}


def test_resnet_handles_8x8_and_32x32() -> None:
    model = ResNetClassifier(widths=(8, 16, 32), blocks_per_stage=2)
    assert len(model.pipeline_blocks()) == 1 + 3 * 2 + 1
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_resnet_learns_digits(tmp_path: object) -> None:
    pl.seed_everything(0)
    model = ResNetClassifier(widths=(8, 16), lr=3e-3)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path),
    )
    trainer.fit(model, DigitsDataModule(batch_size=64))
    # Chance is 0.1. Two epochs reach 0.70-0.84 over seeds 0-2 depending on the initial weights' stream, so
    # the bound sits below that spread rather than at one seed's value.
    assert float(trainer.callback_metrics["val_acc"]) > 0.6


def test_gpt_loss_falls_on_synthetic_tokens(tmp_path: object) -> None:
    pl.seed_everything(0)
    model = GPTLanguageModel(vocab_size=16, block_size=16, n_layer=1, n_head=2, n_embd=32, lr=1e-2)
    data = SyntheticDataModule(kind="tokens", shape=[16], num_classes=16, num_samples=512, batch_size=32)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path),
    )
    trainer.fit(model, data)
    # A random walk of steps in {-2..2} has 5 possible next tokens: the loss falls from ln(16) toward ln(5).
    assert float(trainer.callback_metrics["val_loss"]) < 0.5 * (torch.log(torch.tensor(16.0)) + torch.log(torch.tensor(5.0)))


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: MLPClassifier(hidden=(0,)), "hidden"),
        (lambda: MLPClassifier(activation="sigmoid"), "activation"),
        (lambda: ResNetClassifier(widths=()), "widths"),
        (lambda: ResNetClassifier(blocks_per_stage=0), "blocks_per_stage"),
        (lambda: ResNetClassifier(norm="layer"), "norm"),
        (lambda: GPTLanguageModel(n_embd=30, n_head=4), "n_head=4 must divide n_embd=30"),
        (lambda: GPTLanguageModel(dropout=1.5), "dropout"),
        (lambda: MLPClassifier(lr=0.0), "lr=0.0"),
        (lambda: MLPClassifier(optimizer="lbfgs"), "optimizer='lbfgs'"),
    ],
)
def test_bad_arguments(factory: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()  # type: ignore[operator]


def test_gpt_refuses_sequences_longer_than_block_size() -> None:
    model = GPTLanguageModel(n_layer=1, n_head=2, n_embd=16, block_size=8)
    idx = torch.zeros(1, 9, dtype=torch.long)
    with pytest.raises(ValueError, match="block_size=8"):
        model.pipeline_input((idx, idx))


def test_protocol_check_names_missing_hooks() -> None:
    with pytest.raises(TypeError, match="lacks pipeline_blocks, pipeline_input, pipeline_loss"):
        check_pipeline_protocol(torch.nn.Linear(2, 2), who="ChimeraStrategy")
