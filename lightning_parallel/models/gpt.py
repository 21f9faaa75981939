"""A GPT-style character language model (pre-norm transformer decoder) for the text corpus.

Blocks, in order: the embedding (token + learned position), ``n_layer`` transformer blocks, the head
(final LayerNorm + linear to the vocabulary). Attention is written with ``nn.Linear`` projections and
``scaled_dot_product_attention`` so that per-layer plugins (K-FAC, quantization) see every projection.

With ``tie_weights=True`` the head's output projection is the token embedding's weight (as in GPT-2): one
parameter used by the first and the last block. Its initial value comes from the embedding block (block 0);
the head's initialisation leaves it alone, so a rank that holds only the head must take it from block 0's
stream (the pipeline strategies do; see ``lightning_parallel.pipeline.stage_local``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from typing_extensions import override

from lightning_parallel.models.base import OptimizerName, PipelineClassifier, SchedulerName


class Embedding(nn.Module):
    """Token plus learned position embeddings: ``(B, T)`` ids -> ``(B, T, C)``."""

    def __init__(self, vocab_size: int, block_size: int, n_embd: int, dropout: float) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab_size, n_embd)
        self.position = nn.Embedding(block_size, n_embd)
        self.dropout = nn.Dropout(dropout)

    @override
    def forward(self, idx: Tensor) -> Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        return self.dropout(self.token(idx) + self.position(positions))  # (B, T, C)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.dropout = dropout

    @override
    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout)
        )

    @override
    def forward(self, x: Tensor) -> Tensor:  # (B, T, C) -> (B, T, C)
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPTLanguageModel(PipelineClassifier):
    """Character-level GPT. Batches are ``(idx, targets)``, both ``(B, T)`` token ids.

    Args:
        vocab_size: number of symbols (128 for :class:`~lightning_parallel.data.TextDataModule`). Default 128.
        block_size: longest context, in characters. Default 64.
        n_layer: transformer blocks. Default 4.
        n_head: attention heads; must divide ``n_embd``. Default 4.
        n_embd: embedding width. Default 128.
        dropout: dropout probability. Default 0.
        lr: learning rate. Default 3e-3.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``. Default ``"adamw"``.
        weight_decay: optimizer weight decay. Default 0.
        momentum: SGD momentum. Default 0.9.
        scheduler: ``"none"`` or ``"cosine"``.
        tie_weights: share the token embedding's weight with the head's output projection (GPT-2 style).
            Default False.
        init_seed: seed of the initial weights; ``None`` (default) draws it from torch's random stream.
        build_in_configure_model: build the blocks in ``configure_model()`` (e.g. on the meta device under
            a stage-local pipeline strategy) instead of in ``__init__``. Default False.
    """

    def __init__(
        self,
        vocab_size: int = 128,
        block_size: int = 64,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        *,
        dropout: float = 0.0,
        lr: float = 3e-3,
        optimizer: OptimizerName = "adamw",
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: SchedulerName = "none",
        tie_weights: bool = False,
        init_seed: int | None = None,
        build_in_configure_model: bool = False,
    ) -> None:
        super().__init__(
            num_classes=vocab_size,
            lr=lr,
            optimizer=optimizer,
            weight_decay=weight_decay,
            momentum=momentum,
            scheduler=scheduler,
            init_seed=init_seed,
            build_in_configure_model=build_in_configure_model,
        )
        if block_size < 1 or n_layer < 1:
            raise ValueError(f"block_size={block_size} and n_layer={n_layer} must be >= 1.")
        if n_head < 1 or n_embd % n_head != 0:
            raise ValueError(f"n_head={n_head} must divide n_embd={n_embd} (e.g. n_embd=128, n_head=4).")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1).")
        self.save_hyperparameters()
        self.vocab_size, self.n_layer, self.n_head, self.n_embd = vocab_size, n_layer, n_head, n_embd
        self.block_size = block_size
        self.dropout = dropout
        self.tie_weights = tie_weights
        self._build_unless_deferred()

    @override
    def build_blocks(self) -> nn.Sequential:
        embedding = Embedding(self.vocab_size, self.block_size, self.n_embd, self.dropout)
        head = nn.Sequential(nn.LayerNorm(self.n_embd), nn.Linear(self.n_embd, self.vocab_size))
        if self.tie_weights:
            head[1].weight = embedding.token.weight  # (vocab, C) serves both lookups and logits
        return nn.Sequential(
            embedding,
            *(TransformerBlock(self.n_embd, self.n_head, self.dropout) for _ in range(self.n_layer)),
            head,
        )

    @override
    def init_block(self, index: int, block: nn.Module) -> None:
        """Normal(0, 0.02) weights of linear and embedding layers, zero biases, unit LayerNorms; the tied
        head weight is block 0's and is left alone here."""
        tied = self.tie_weights and index == self.n_layer + 1
        for module in block.modules():
            if isinstance(module, nn.Linear):
                if not tied:
                    nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    @override
    def pipeline_input(self, batch: Any) -> Tensor:
        """The token ids ``(B, T)``; longer sequences than ``block_size`` are refused by the embedding."""
        idx = batch[0]
        if idx.shape[1] > self.block_size:
            raise ValueError(
                f"A sequence of {idx.shape[1]} tokens exceeds block_size={self.block_size}; "
                "raise block_size or shorten the data's block_size."
            )
        return idx
