"""Attention with some heads removed: what slimming makes of an ``nn.MultiheadAttention`` whose heads were
dropped.

``nn.MultiheadAttention`` ties its heads' total width to the model width (embed_dim = heads × head_dim),
so fewer heads need a module of its own: :class:`SlimMultiheadAttention` keeps the q, k and v projections
and the output projection columns of the kept heads only, and computes what the original computes with the
dropped heads' contribution zeroed (their output projection columns masked), for the same arguments.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SlimMultiheadAttention", "removable_heads"]


def removable_heads(attention: nn.Module) -> bool:
    """Whether slimming can remove heads of ``attention``: an ``nn.MultiheadAttention`` with one projection
    of q, k and v and without bias_k, bias_v or add_zero_attn."""
    return (isinstance(attention, nn.MultiheadAttention) and attention._qkv_same_embed_dim
            and attention.bias_k is None and attention.bias_v is None and not attention.add_zero_attn)


class SlimMultiheadAttention(nn.Module):
    """``attention`` (see :func:`removable_heads`) with only the heads in ``kept`` (bool [num_heads], at
    least one); the same forward arguments and results (``need_weights`` averages the kept heads' weights,
    as the original averages all of its heads, dropped ones included, so the weights alone differ)."""

    def __init__(self, attention: nn.MultiheadAttention, kept: Tensor):
        super().__init__()
        heads, head_dim, embed_dim = attention.num_heads, attention.head_dim, attention.embed_dim
        index = torch.nonzero(kept.to(attention.in_proj_weight.device)).flatten()
        self.register_buffer("kept_heads", index)  # of the original's, for per-head attention masks
        self.original_heads = heads
        self.num_heads, self.head_dim, self.embed_dim = index.numel(), head_dim, embed_dim
        self.batch_first, self.dropout = attention.batch_first, attention.dropout
        weight = attention.in_proj_weight.detach().view(3, heads, head_dim, embed_dim)[:, index]
        self.in_proj_weight = nn.Parameter(weight.reshape(-1, embed_dim).clone())
        bias = attention.in_proj_bias
        self.in_proj_bias = None if bias is None else nn.Parameter(
            bias.detach().view(3, heads, head_dim)[:, index].reshape(-1).clone())
        out = attention.out_proj
        self.out_proj = nn.Linear(self.num_heads * head_dim, embed_dim, bias=out.bias is not None,
                                  device=out.weight.device, dtype=out.weight.dtype)
        with torch.no_grad():
            self.out_proj.weight.copy_(out.weight.view(embed_dim, heads, head_dim)[:, index].reshape(embed_dim, -1))
            if out.bias is not None:
                self.out_proj.bias.copy_(out.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        batched = query.dim() == 3
        if not batched:  # [L, E]: one sequence
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        L, B, _ = query.shape
        S = key.shape[0]
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        heads = lambda x, n: x.reshape(n, B * self.num_heads, self.head_dim).transpose(0, 1)  # noqa: E731
        q, k, v = (heads(F.linear(query, w_q, b_q), L), heads(F.linear(key, w_k, b_k), S),
                   heads(F.linear(value, w_v, b_v), S))
        mask = _additive(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:  # [B * the original's heads, L, S]: the kept heads' rows
            mask = mask.view(B, self.original_heads, L, S)[:, self.kept_heads].reshape(-1, L, S)
        if is_causal and attn_mask is None:
            mask = torch.full((L, S), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, q.dtype).view(B, 1, 1, S).expand(B, self.num_heads, 1, S)
            padding = padding.reshape(B * self.num_heads, 1, S)
            mask = padding if mask is None else mask + padding
        scores = torch.bmm(q / math.sqrt(self.head_dim), k.transpose(1, 2))
        if mask is not None:
            scores = scores + mask
        weights = F.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(L, B, self.num_heads * self.head_dim)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = weights.view(B, self.num_heads, L, S)
        weights = weights.mean(dim=1) if average_attn_weights else weights
        return out, (weights if batched else weights.squeeze(0))


def _additive(mask: Optional[Tensor], dtype) -> Optional[Tensor]:
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
