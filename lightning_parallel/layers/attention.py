"""``nn.MultiheadAttention``'s forward with its four projections made visible (pure torch, no Lightning).

``nn.MultiheadAttention`` applies ``in_proj_weight`` and ``out_proj.weight`` inside
``F.multi_head_attention_forward`` (or, in evaluation without gradients, inside a fused kernel), so no module
hook ever sees the input or the output of a projection, and a swapped ``out_proj`` is never called.
:func:`attention_forward` computes the same function with the four projections (query, key, value, output;
index 0 to 3) as separate ``F.linear`` calls through a ``project(index, input, weight, bias)`` callable, and
hands each projection's input and output to the hooks added by :func:`add_projection_hook`.

Design decisions:

- Same arithmetic as ``F.multi_head_attention_forward``'s non-fused path (mask canonicalisation,
  ``bias_k``/``bias_v``, ``add_zero_attn``, dropout, ``need_weights`` through an explicit softmax, otherwise
  ``F.scaled_dot_product_attention``), except that a packed self-attention in-projection is three
  ``(E, E)`` products instead of one ``(3E, E)`` product: the outputs agree to float rounding (tested against
  the module's own forward).
- A plain ``nn.MultiheadAttention`` gets this forward only while a projection hook is attached (an instance
  attribute ``forward``, removed with the last hook), so it keeps torch's forward, fast path included,
  otherwise. Modules whose class sets ``projection_forward = True`` (the QAT attention) always run it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Project = Callable[[int, Tensor, Tensor, "Tensor | None"], Tensor]
ProjectionHook = Callable[[int, Tensor, Tensor], None]
Weights = tuple[
    Tensor, Tensor, Tensor, "Tensor | None", "Tensor | None", "Tensor | None", Tensor, "Tensor | None"
]

_HOOKS = "_lp_projection_hooks"


def projection_weights(module: nn.MultiheadAttention) -> Weights:
    """``(w_q, w_k, w_v, b_q, b_k, b_v, w_out, b_out)``: the four projections' weights (views) and biases."""
    if module._qkv_same_embed_dim:
        w_q, w_k, w_v = module.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    bias = module.in_proj_bias
    b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
    return w_q, w_k, w_v, b_q, b_k, b_v, module.out_proj.weight, module.out_proj.bias


def _linear(index: int, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight, bias)


def attention_forward(
    module: Any,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    *,
    weights: Weights | None = None,
    project: Project = _linear,
) -> tuple[Tensor, Tensor | None]:
    """``module(query, key, value, ...)`` with the projections done by ``project``.

    Args:
        module: the attention module: an ``nn.MultiheadAttention`` or an object with its ``num_heads``,
            ``batch_first``, ``dropout``, ``training``, ``bias_k``, ``bias_v`` and ``add_zero_attn``.
        query: as for ``nn.MultiheadAttention.forward``.
        key: as for ``nn.MultiheadAttention.forward``.
        value: as for ``nn.MultiheadAttention.forward``.
        key_padding_mask: as for ``nn.MultiheadAttention.forward``.
        need_weights: as for ``nn.MultiheadAttention.forward``.
        attn_mask: as for ``nn.MultiheadAttention.forward``.
        average_attn_weights: as for ``nn.MultiheadAttention.forward``.
        is_causal: as for ``nn.MultiheadAttention.forward``.
        weights: the projections' weights and biases (default :func:`projection_weights`).
        project: ``project(index, input, weight, bias)`` computes projection ``index`` (0 query, 1 key,
            2 value, 3 output); default ``F.linear``.

    Returns:
        ``(output, attention weights or None)``, as ``nn.MultiheadAttention.forward``.
    """
    w_q, w_k, w_v, b_q, b_k, b_v, w_o, b_o = projection_weights(module) if weights is None else weights
    hooks: dict[int, ProjectionHook] = getattr(module, _HOOKS, {})

    def run(index: int, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        y = project(index, x, w, b)
        if hooks:
            # hooks see the input batch-first, (B, L, E), so that its first dimension counts the examples
            seen = x.view(tgt_len, bsz, -1).transpose(0, 1) if index == 3 else x.transpose(0, 1)
            for hook in list(hooks.values()):
                hook(index, seen, y)
        return y

    batched = query.dim() == 3
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=query.dtype,
    )
    attn_mask = F._canonical_mask(
        mask=attn_mask,
        mask_name="attn_mask",
        other_type=None,
        other_name="",
        target_type=query.dtype,
        check_other=False,
    )
    if module.batch_first and batched:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    if not batched:
        query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    heads = module.num_heads
    head_dim = embed_dim // heads
    if is_causal and attn_mask is None:
        raise RuntimeError("is_causal=True needs attn_mask (as for nn.MultiheadAttention).")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
    elif key_padding_mask is not None:
        is_causal = False

    q = run(0, query, w_q, b_q)  # (T, B, E)
    k = run(1, key, w_k, b_k)  # (S, B, E)
    v = run(2, value, w_v, b_v)
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)  # (1, T, S); a 3-D mask is (B*H, T, S)
    if module.bias_k is not None and module.bias_v is not None:
        k = torch.cat([k, module.bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, module.bias_v.repeat(1, bsz, 1)])
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)  # (B*H, T, D)
    k = k.reshape(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
    v = v.reshape(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
    if module.add_zero_attn:
        zeros = k.new_zeros(bsz * heads, 1, head_dim)
        k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    src_len = k.shape[1]
    if key_padding_mask is not None:
        padding = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
        padding = padding.reshape(bsz * heads, 1, src_len)
        attn_mask = padding if attn_mask is None else attn_mask + padding
    dropout = module.dropout if module.training else 0.0

    probs: Tensor | None = None
    if need_weights:
        scores = q * math.sqrt(1.0 / head_dim)
        scores = (
            torch.bmm(scores, k.transpose(-2, -1))
            if attn_mask is None
            else torch.baddbmm(attn_mask, scores, k.transpose(-2, -1))
        )
        probs = F.softmax(scores, dim=-1)  # (B*H, T, S)
        if dropout > 0.0:
            probs = F.dropout(probs, p=dropout)
        out = torch.bmm(probs, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
    else:
        if attn_mask is not None:
            attn_mask = (
                attn_mask.unsqueeze(0)
                if attn_mask.size(0) == 1 and attn_mask.dim() == 3
                else attn_mask.view(bsz, heads, -1, src_len)
            )
        out = F.scaled_dot_product_attention(
            q.view(bsz, heads, tgt_len, head_dim),
            k.view(bsz, heads, src_len, head_dim),
            v.view(bsz, heads, src_len, head_dim),
            attn_mask,
            dropout,
            is_causal,
        )
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    out = run(3, out, w_o, b_o).view(tgt_len, bsz, -1)
    if probs is not None:
        probs = probs.view(bsz, heads, tgt_len, src_len)
        if average_attn_weights:
            probs = probs.mean(dim=1)
    if not batched:
        out = out.squeeze(1)
        probs = None if probs is None else probs.squeeze(0)
    elif module.batch_first:
        out = out.transpose(0, 1)
    return out, probs


def add_projection_hook(module: nn.MultiheadAttention, hook: ProjectionHook) -> ProjectionHandle:
    """Call ``hook(index, input, output)`` after each projection of ``module``'s forward.

    A plain ``nn.MultiheadAttention`` runs :func:`attention_forward` while at least one hook is attached.

    Args:
        module: the attention module.
        hook: called with the projection's index (0 query, 1 key, 2 value, 3 output), input and output.

    Returns:
        A handle whose ``remove()`` detaches the hook (and restores the module's own forward).
    """
    hooks: dict[int, ProjectionHook] = module.__dict__.setdefault(_HOOKS, {})
    if not getattr(type(module), "projection_forward", False) and "forward" not in module.__dict__:
        module.__dict__["forward"] = _PlainForward(module)
    return ProjectionHandle(module, hooks, hook)


class ProjectionHandle:
    """Detaches a hook added by :func:`add_projection_hook`.

    Args:
        module: the attention module.
        hooks: its hook table.
        hook: the hook to attach.
    """

    _next_id = 0

    def __init__(self, module: nn.Module, hooks: dict[int, ProjectionHook], hook: ProjectionHook) -> None:
        self.module, self.hooks = module, hooks
        self.id = ProjectionHandle._next_id
        ProjectionHandle._next_id += 1
        hooks[self.id] = hook

    def remove(self) -> None:
        """Detach the hook; the last one also gives a plain ``nn.MultiheadAttention`` its own forward back."""
        self.hooks.pop(self.id, None)
        if not self.hooks and isinstance(self.module.__dict__.get("forward"), _PlainForward):
            del self.module.__dict__["forward"]


class _PlainForward:
    """The instance ``forward`` of a hooked plain ``nn.MultiheadAttention``: :func:`attention_forward`."""

    def __init__(self, module: nn.MultiheadAttention) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        return attention_forward(self.module, *args, **kwargs)
