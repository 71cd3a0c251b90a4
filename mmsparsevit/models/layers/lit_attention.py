# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Global multi-head self-attention of LIT's late stages."""
from functools import lru_cache
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_

from .relative_position_attention import relative_position_attention


@lru_cache(maxsize=16)
def _relative_position_index(height: int, width: int, device: torch.device) -> torch.Tensor:
    """Index into a (2H-1) x (2W-1) table for every ordered pair of tokens of an H x W map.

    Entry n * H * W + m is ``(y_n - y_m + H - 1) * (2W - 1) + (x_n - x_m + W - 1)`` for
    tokens n, m in row-major order. Cached per size and device: every attention block of a
    stage asks for it, and a copy to the GPU per call would move (H*W)^2 integers.
    """
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device), torch.arange(width, device=device), indexing='ij')
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + height - 1
    dx = xs[:, None] - xs[None, :] + width - 1
    return (dy * (2 * width - 1) + dx).flatten()


class LITAttention(BaseModule):
    """Global multi-head self-attention over all tokens of a feature map.

    ``forward(x, hw_shape)`` projects the tokens ``x`` (B, N, C) to queries, keys and values
    (``qkv``), computes softmax attention with the logits of :meth:`attention_logits`
    (scaled dot products plus the relative-position bias), attention dropout, the value
    product and the output projection (``proj``). Without a bias (LIT-Ti) this class runs
    that in one ``F.scaled_dot_product_attention`` call; with the bias in
    :func:`relative_position_attention`, which reads the bias from a strided view of the
    resized table instead of gathering it per token pair. Subclasses may override
    :meth:`attention_logits` alone (e.g. to keep only the top-k logits per query) and reuse
    every parameter and state-dict key of this module; ``forward`` then materialises their
    logits and applies softmax to them, so logits of excluded pairs should be ``-inf``.

    Position information (LIT's Swin-style models) is a learned relative-position bias: a
    table of shape ((2h-1)(2w-1), heads) for a reference map of h x w tokens, resized
    bicubically at run time to the (2H-1) x (2W-1) offsets of the actual H x W map
    (:meth:`relative_position_table`; :meth:`relative_position_bias` gathers it per token
    pair). LIT-Ti uses absolute position embeddings instead (added by the
    backbone) and builds this module with ``rel_pos_size=None``.

    Args:
        embed_dims (int): Token channels C.
        num_heads (int): Number of heads; must divide ``embed_dims``.
        qkv_bias (bool): Whether ``qkv`` has a bias. Defaults to True.
        qk_scale (float, optional): Logit scale; head_dim ** -0.5 when None. Defaults to None.
        attn_drop_rate (float): Dropout on the attention weights. Defaults to 0.
        proj_drop_rate (float): Dropout after the output projection. Defaults to 0.
        rel_pos_size (Sequence[int], optional): (h, w) of the map the relative-position table
            is laid out for; None disables the bias. Defaults to None.
        init_cfg (dict, optional): Initialization config. Defaults to None.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 attn_drop_rate: float = 0.,
                 proj_drop_rate: float = 0.,
                 rel_pos_size: Optional[Sequence[int]] = None,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if embed_dims % num_heads != 0:
            raise ValueError(f'embed_dims ({embed_dims}) must be divisible by num_heads '
                             f'({num_heads})')
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.scale = qk_scale or (embed_dims // num_heads)**-0.5
        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop_rate)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop_rate)
        if rel_pos_size is None:
            self.rel_pos_size = None
            self.relative_position_bias_table = None
        else:
            self.rel_pos_size = tuple(rel_pos_size)
            height, width = self.rel_pos_size
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros((2 * height - 1) * (2 * width - 1), num_heads))

    def init_weights(self) -> None:
        """Truncated-normal relative-position table (std 0.02), then ``init_cfg``."""
        if self.relative_position_bias_table is not None:
            trunc_normal_(self.relative_position_bias_table, std=.02)
        if self.init_cfg is not None:
            super().init_weights()

    def relative_position_table(self, hw_shape: Tuple[int, int]) -> torch.Tensor:
        """The table resized to the offsets of an H x W map: (heads, 2H-1, 2W-1); entry
        ``[h, dy + H - 1, dx + W - 1]`` is head h's bias of a query dy rows below and dx
        columns right of its key."""
        height, width = hw_shape
        ref_h, ref_w = self.rel_pos_size
        # Resized unconditionally: at the table's own size bicubic resampling is the identity
        # (every sample falls on a source point), and a branch on the map size would make
        # torch.compile recompile for each map that matches the table in one dimension.
        table = self.relative_position_bias_table.t()
        grid = table.reshape(1, self.num_heads, 2 * ref_h - 1, 2 * ref_w - 1)
        return F.interpolate(grid, size=(2 * height - 1, 2 * width - 1), mode='bicubic')[0]

    def relative_position_bias(self, hw_shape: Tuple[int, int]) -> torch.Tensor:
        """Bias of shape (heads, H*W, H*W) for an H x W map, from the (resized) table."""
        height, width = hw_shape
        per_head = self.relative_position_table(hw_shape).reshape(self.num_heads, -1)
        # Gathering along the per-head rows writes each head's N x N block contiguously: 3x
        # faster on the CPU (measured at 32 x 32 tokens) than indexing the (T, heads) table
        # and permuting the result.
        index = _relative_position_index(height, width, per_head.device)
        num_tokens = height * width
        return per_head.index_select(1, index).view(self.num_heads, num_tokens, num_tokens)

    def attention_logits(self, query: torch.Tensor, key: torch.Tensor,
                         hw_shape: Tuple[int, int]) -> torch.Tensor:
        """Pre-softmax attention logits.

        Args:
            query (Tensor): (B, heads, N, head_dim), not yet scaled.
            key (Tensor): (B, heads, N, head_dim).
            hw_shape (tuple[int, int]): (H, W) of the token map, H * W = N.

        Returns:
            Tensor: (B, heads, N, N) scaled dot products plus the relative-position bias.
        """
        logits = (query * self.scale) @ key.transpose(-2, -1)
        if self.relative_position_bias_table is not None:
            logits = logits + self.relative_position_bias(hw_shape).unsqueeze(0)
        return logits

    def forward(self, x: torch.Tensor, hw_shape: Tuple[int, int]) -> torch.Tensor:
        """Attend over all tokens.

        Args:
            x (Tensor): Tokens (B, N, C) in row-major order of the map.
            hw_shape (tuple[int, int]): (H, W) of the map.

        Returns:
            Tensor: (B, N, C).
        """
        batch, num_tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads,
                                  channels // self.num_heads).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        dropout_p = self.attn_drop.p if self.training else 0.
        if type(self).attention_logits is not LITAttention.attention_logits:
            attn = self.attention_logits(query, key, hw_shape).softmax(dim=-1)
            x = self.attn_drop(attn) @ value
        elif self.relative_position_bias_table is None:
            x = F.scaled_dot_product_attention(
                query, key, value, dropout_p=dropout_p, scale=self.scale)
        elif torch.onnx.is_in_onnx_export():
            # The exporter has no symbolic for the strided view the fast path reads the bias
            # from; the gathered bias exports as Gather.
            x = F.scaled_dot_product_attention(
                query, key, value, attn_mask=self.relative_position_bias(hw_shape).unsqueeze(0),
                scale=self.scale)
        else:
            x = relative_position_attention(query, key, value,
                                            self.relative_position_table(hw_shape), self.scale,
                                            dropout_p)
        x = x.transpose(1, 2).reshape(batch, num_tokens, channels)
        return self.proj_drop(self.proj(x))
