"""LightningModules written the way users write them: no pipeline protocol hooks.

Used by the adapter tests and by the "lines of user code" count in benchmarks/RESULTS.md. Each trains on one
device as it is; the pipeline strategies reach them only through their adapter options.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _Plain(pl.LightningModule):
    """``training_step`` = cross-entropy of ``self(x)``; SGD with momentum."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.save_hyperparameters()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class SequentialCNN(_Plain):
    """A small CNN that is one ``nn.Sequential`` (``self.net``): 3x8x8 images -> 4 classes."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__(lr)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # type: ignore[no-any-return]


class EncoderClassifier(_Plain):
    """Token classifier around torch's ``nn.TransformerEncoder``: embed -> encoder -> pool -> head."""

    def __init__(self, vocab: int = 32, width: int = 16, layers: int = 4, classes: int = 4, lr: float = 0.05) -> None:
        super().__init__(lr)
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def pool(self, h: Tensor) -> Tensor:
        return h.mean(dim=1)  # (B, T, C) -> (B, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.encoder(self.embed(x))))  # type: ignore[no-any-return]


def cnn_data(size: int, seed: int = 1) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, 4, (size,), generator=g))


def token_data(size: int, seq: int = 8, vocab: int = 32, seed: int = 1) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(
        torch.randint(0, vocab, (size, seq), generator=g), torch.randint(0, 4, (size,), generator=g)
    )


class HFCausalLM(pl.LightningModule):
    """A Hugging Face causal LM from a small random config, trained the way its docs show.

    ``family="gpt2"`` (tied ``lm_head``) reads ``(input_ids, next-token targets)`` batches and takes the
    cross-entropy of the logits; ``family="llama"`` reads ``{"input_ids": ...}`` batches and uses the model's
    own shifted loss, ``model(input_ids, labels=input_ids).loss``. ``meta_in_configure_model`` builds the
    model in ``configure_model`` (on the meta device under a stage-local strategy).
    """

    def __init__(self, family: str = "gpt2", vocab: int = 32, width: int = 16, layers: int = 4, lr: float = 0.01,
                 build_in_configure_model: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.family, self.lr = family, lr
        self.config = hf_config(family, vocab, width, layers)
        self.build_in_configure_model = build_in_configure_model
        if not build_in_configure_model:
            self.configure_model()

    def configure_model(self) -> None:
        if hasattr(self, "model"):
            return
        import transformers

        cls = transformers.GPT2LMHeadModel if self.family == "gpt2" else transformers.LlamaForCausalLM
        self.model = cls(self.config)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.family == "gpt2":
            idx, targets = batch
            logits = self.model(idx).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        else:
            loss = self.model(batch["input_ids"], labels=batch["input_ids"]).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def hf_config(family: str, vocab: int, width: int, layers: int) -> Any:
    import transformers

    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab, n_positions=32, n_embd=width, n_layer=layers, n_head=2, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )
    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
        pad_token_id=0,
    )


class _DictTokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, ids: Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[index]}


def lm_data(family: str, size: int, seq: int = 12, vocab: int = 32, seed: int = 1) -> Any:
    """GPT-2: ``(ids, next ids)`` pairs; Llama: ``{"input_ids": ids}`` mappings."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (size, seq + 1), generator=g)
    if family == "gpt2":
        return torch.utils.data.TensorDataset(ids[:, :-1], ids[:, 1:])
    return _DictTokens(ids[:, :-1])
