"""The reference for attention tests: multi-head attention written with four nn.Linear projections."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ExplicitAttention(nn.Module):
    """``attn``'s function (batch-first, no masks) with its projections as nn.Linear layers ``q, k, v, o``.

    Args:
        attn: the attention whose weights are copied.
    """

    def __init__(self, attn: nn.MultiheadAttention) -> None:
        super().__init__()
        e = attn.embed_dim
        self.heads = attn.num_heads
        dtype = attn.in_proj_weight.dtype
        self.q, self.k, self.v, self.o = (nn.Linear(e, e, dtype=dtype) for _ in range(4))
        with torch.no_grad():
            for i, proj in enumerate((self.q, self.k, self.v)):
                proj.weight.copy_(attn.in_proj_weight[i * e : (i + 1) * e])
                proj.bias.copy_(attn.in_proj_bias[i * e : (i + 1) * e])
            self.o.weight.copy_(attn.out_proj.weight)
            self.o.bias.copy_(attn.out_proj.bias)

    def forward(self, query: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        memory = query if memory is None else memory
        b, t, e = query.shape

        def heads(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, -1, self.heads, e // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.q(query)), heads(self.k(memory)), heads(self.v(memory))
        )
        return self.o(out.transpose(1, 2).reshape(b, t, e))
