"""Attention with some heads removed: what slimming makes of an attention module whose heads were dropped.

``nn.MultiheadAttention`` and torchvision's Swin attention tie their heads' total width to the model width
(embed_dim = heads × head_dim), so fewer heads need modules of their own: :class:`SlimMultiheadAttention`
and :class:`SlimWindowAttention` keep the q, k and v projections and the output projection columns of the
kept heads only, and compute what the original computes with the dropped heads' contribution zeroed
(their output projection columns masked), for the same arguments.
"""

from __future__ import annotations

import copy
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SlimMultiheadAttention", "SlimWindowAttention", "removable_heads", "slim_attention"]


def removable_heads(attention: nn.Module) -> bool:
    """Whether slimming can remove heads of ``attention``: an ``nn.MultiheadAttention`` with one projection
    of q, k and v and without bias_k, bias_v or add_zero_attn, or torchvision's Swin attention."""
    if isinstance(attention, nn.MultiheadAttention):
        return (attention._qkv_same_embed_dim and attention.bias_k is None and attention.bias_v is None
                and not attention.add_zero_attn)
    return True  # is_attention: torchvision's Swin attention


def slim_attention(attention: nn.Module, kept: Tensor) -> nn.Module:
    """``attention`` with only the heads in ``kept`` (see :func:`removable_heads`)."""
    if isinstance(attention, nn.MultiheadAttention):
        return SlimMultiheadAttention(attention, kept)
    return SlimWindowAttention(attention, kept)


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


class SlimWindowAttention(nn.Module):
    """torchvision's Swin attention (``ShiftedWindowAttention`` or its V2) with only the heads in ``kept``
    (bool [num_heads], at least one): the q, k, v rows and output projection columns of the kept heads, the
    relative position bias (and V2's logit scale) of those heads; its output equals the original's with the
    dropped heads' contribution zeroed."""

    def __init__(self, attention: nn.Module, kept: Tensor):
        super().__init__()
        heads, width = attention.num_heads, attention.proj.in_features
        head_dim = width // heads
        index = torch.nonzero(kept.to(attention.qkv.weight.device)).flatten()
        self.register_buffer("kept_heads", index)
        self.heads, self.head_dim = index.numel(), head_dim
        self.window_size, self.shift_size = list(attention.window_size), list(attention.shift_size)
        self.attention_dropout, self.dropout = attention.attention_dropout, attention.dropout
        # the original without its projections, for its relative position bias (all heads; the kept ones taken)
        position = copy.copy(attention)
        position._parameters, position._buffers = dict(attention._parameters), dict(attention._buffers)
        position._modules = {k: v for k, v in attention._modules.items() if k not in ("qkv", "proj")}
        self.position = position
        rows = index.new_tensor([[part * heads + h for h in index.tolist()] for part in range(3)]).flatten()
        qkv, proj = attention.qkv, attention.proj
        self.qkv = nn.Linear(qkv.in_features, 3 * self.heads * head_dim, bias=qkv.bias is not None,
                             device=qkv.weight.device, dtype=qkv.weight.dtype)
        self.proj = nn.Linear(self.heads * head_dim, proj.out_features, bias=proj.bias is not None,
                              device=proj.weight.device, dtype=proj.weight.dtype)
        with torch.no_grad():
            self.qkv.weight.copy_(qkv.weight.view(3 * heads, head_dim, -1)[rows].reshape(-1, qkv.in_features))
            if qkv.bias is not None:
                self.qkv.bias.copy_(qkv.bias.view(3 * heads, head_dim)[rows].reshape(-1))
            self.proj.weight.copy_(proj.weight.view(-1, heads, head_dim)[:, index].reshape(proj.out_features, -1))
            if proj.bias is not None:
                self.proj.bias.copy_(proj.bias)
        self.cosine = hasattr(attention, "logit_scale")

    def forward(self, x: Tensor) -> Tensor:
        bias = self.position.get_relative_position_bias()[:, self.kept_heads]
        B, H, W, C = x.shape
        wh, ww = self.window_size
        x = F.pad(x, (0, 0, 0, (ww - W % ww) % ww, 0, (wh - H % wh) % wh))
        _, pH, pW, _ = x.shape
        shift = [0 if wh >= pH else self.shift_size[0], 0 if ww >= pW else self.shift_size[1]]
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = (pH // wh) * (pW // ww)
        x = x.view(B, pH // wh, wh, pW // ww, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B * windows, wh * ww, C)
        qkv_bias = self.qkv.bias
        if self.cosine and qkv_bias is not None:  # V2: no bias on k
            qkv_bias = torch.cat([qkv_bias.view(3, -1)[:1], torch.zeros_like(qkv_bias.view(3, -1)[1:2]),
                                  qkv_bias.view(3, -1)[2:]]).flatten()
        n = wh * ww
        q, k, v = F.linear(x, self.qkv.weight, qkv_bias).view(-1, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.cosine:
            scale = torch.clamp(self.position.logit_scale[self.kept_heads], max=math.log(100.0)).exp()
            scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * scale
        else:
            scores = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
        scores = scores + bias
        if sum(shift) > 0:  # tokens of different regions of the shifted map do not attend to each other
            region = x.new_zeros((pH, pW))
            count = 0
            for hs in ((0, -wh), (-wh, -shift[0]), (-shift[0], None)):
                for ws in ((0, -ww), (-ww, -shift[1]), (-shift[1], None)):
                    region[hs[0]:hs[1], ws[0]:ws[1]] = count
                    count += 1
            region = region.view(pH // wh, wh, pW // ww, ww).permute(0, 2, 1, 3).reshape(windows, n)
            mask = (region.unsqueeze(1) - region.unsqueeze(2)) != 0
            mask = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device).masked_fill(mask, -100.0)
            scores = (scores.view(B, windows, self.heads, n, n) + mask.unsqueeze(1)).view(-1, self.heads, n, n)
        weights = F.dropout(F.softmax(scores, dim=-1), p=self.attention_dropout, training=self.training)
        x = (weights @ v).transpose(1, 2).reshape(-1, n, self.heads * self.head_dim)
        x = F.dropout(self.proj(x), p=self.dropout, training=self.training)
        x = x.view(B, pH // wh, pW // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B, pH, pW, C)
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
        return x[:, :H, :W, :].contiguous()
