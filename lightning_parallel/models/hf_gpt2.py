"""A Hugging Face ``GPT2LMHeadModel`` built from a small random ``GPT2Config``, as a plain LightningModule.

It is the "model this project did not write" of the configs and benchmarks: GPT-2's attention and MLP are
``transformers.pytorch_utils.Conv1D`` layers (a linear layer with a transposed weight) and its ``lm_head`` is
tied to the token embedding. ``transformers`` (the ``hf`` extra) is imported when the module is built, never
by ``import lightning_parallel``. The model does not implement the pipeline protocol.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.nn import functional as F
from typing_extensions import override

from lightning_parallel.data.text import VOCAB_SIZE


def require_transformers(feature: str) -> Any:
    """Import and return ``transformers``, or raise ``ModuleNotFoundError`` with the install command.

    Args:
        feature: what needs transformers, for the message.
    """
    try:
        import transformers
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"{feature} requires the transformers package, which is not installed. Install it with: "
            'pip install "lightning-parallel[hf]"'
        ) from err
    return transformers


class HFGPT2LanguageModel(pl.LightningModule):
    """Next-character prediction with a randomly initialised Hugging Face GPT-2 (no download).

    Args:
        vocab_size: vocabulary size. Default 128 (the text corpus's).
        block_size: context length (``n_positions``). Default 64.
        n_embd: width. Default 64.
        n_layer: transformer blocks. Default 2.
        n_head: attention heads. Default 4.
        lr: learning rate. Default 3e-3.
        weight_decay: weight decay. Default 0.0.
        optimizer: ``"adamw"`` or ``"sgd"`` (momentum 0.9). Default ``"adamw"``.
    """

    def __init__(
        self,
        vocab_size: int = VOCAB_SIZE,
        block_size: int = 64,
        n_embd: int = 64,
        n_layer: int = 2,
        n_head: int = 4,
        *,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        optimizer: Literal["adamw", "sgd"] = "adamw",
    ) -> None:
        super().__init__()
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer={optimizer!r} is not supported; use 'adamw' or 'sgd'.")
        self.save_hyperparameters()
        transformers = require_transformers("HFGPT2LanguageModel")
        config = transformers.GPT2Config(
            vocab_size=vocab_size,
            n_positions=block_size,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            bos_token_id=0,
            eos_token_id=0,
        )
        self.model = transformers.GPT2LMHeadModel(config)

    @override
    def forward(self, idx: Tensor) -> Tensor:
        return self.model(idx).logits  # type: ignore[no-any-return]  # (B, T, V)

    def _loss(self, batch: Any) -> Tensor:
        idx, targets = batch
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    @override
    def configure_optimizers(self) -> Any:
        hp: Any = self.hparams
        if hp.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
        return torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
