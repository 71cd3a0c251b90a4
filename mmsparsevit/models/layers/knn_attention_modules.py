# Copyright (c) mmsparsevit contributors. All rights reserved.
"""k-NN versions of the attention modules that KVT converts.

Each class is built from the module it replaces (``KNNWindowMSA(window_msa, topk)``) and
takes over that module's parameters, buffers and submodules as they are: the same objects
under the same names, so the replacement has the replaced module's state-dict keys, and an
optimizer or checkpoint holding the old tensors holds the new module's. Only the attention
changes: the softmax runs over each query's top-k keys (:func:`knn_attention`). Hooks
registered on the replaced module are not carried over.

mmdet's and mmseg's ``WindowMSA`` are converted by one class that reads the attributes both
define, and the classes for timm's and mmseg's modules read the attributes of the module they
are given, so this file imports neither toolbox nor timm.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_

from .knn_attention import TopkSpec, check_topk_spec, knn_attention
from .lit_attention import LITAttention


class _KNNAttention(nn.Module):
    """What the k-NN modules share: taking over a module, the top-k setting, ``repr``.

    Every subclass is built as ``KNNx(module, topk, chunk_size=None)``: ``module`` is the
    attention it replaces, ``topk`` (int | float) the keys each query keeps, as in
    :func:`knn_attention`, and ``chunk_size`` (int, optional) the query rows per chunk
    (None: automatic).
    """

    knn_topk: TopkSpec
    knn_chunk_size: Optional[int]
    # Plain (non-tensor) attributes of the replaced module that the forward reads.
    taken_attributes: Tuple[str, ...] = ()

    def _take_over(self, source: nn.Module, topk: TopkSpec,
                   chunk_size: Optional[int]) -> None:
        """Hold ``source``'s parameters, buffers and submodules, in its mode, and the top-k."""
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f'chunk_size must be a positive int, got {chunk_size}')
        # The registration dicts themselves, so that order (hence state-dict order), None
        # entries and tied tensors are kept exactly.
        for name, param in source._parameters.items():
            self.register_parameter(name, param)
        for name, buffer in source._buffers.items():
            self.register_buffer(
                name, buffer, persistent=name not in source._non_persistent_buffers_set)
        for name, child in source._modules.items():
            self.add_module(name, child)
        # A model converted in eval mode must not start dropping attention weights.
        self.training = source.training
        for name in self.taken_attributes:
            setattr(self, name, getattr(source, name))
        self.knn_topk = check_topk_spec(topk)
        self.knn_chunk_size = chunk_size

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                dropout_p: float, **kwargs) -> torch.Tensor:
        """:func:`knn_attention` with this module's top-k and chunking; dropout in training."""
        return knn_attention(
            query,
            key,
            value,
            self.knn_topk,
            dropout_p=dropout_p if self.training else 0.,
            chunk_size=self.knn_chunk_size,
            **kwargs)

    def extra_repr(self) -> str:
        settings = [super().extra_repr(), f'knn_topk={self.knn_topk!r}']
        if self.knn_chunk_size is not None:
            settings.append(f'knn_chunk_size={self.knn_chunk_size}')
        return ', '.join(filter(None, settings))


class _KNNBaseModule(_KNNAttention, BaseModule):
    """A k-NN replacement of an mmengine ``BaseModule`` attention, keeping its ``init_cfg``."""

    def __init__(self,
                 attention: nn.Module,
                 topk: TopkSpec,
                 chunk_size: Optional[int] = None) -> None:
        super().__init__(init_cfg=attention.init_cfg)
        self._take_over(attention, topk, chunk_size)


class KNNWindowMSA(_KNNBaseModule):
    """Swin's window attention (mmdet's or mmseg's ``WindowMSA``) with k-NN selection.

    Selection happens after scaling and after the relative-position bias; pairs the shifted-
    window mask forbids (any nonzero mask value; Swin uses -100) are never selected.

    Args:
        attention (nn.Module): The ``WindowMSA`` to replace; its ``qkv``, ``proj``,
            dropouts, ``relative_position_bias_table`` and ``relative_position_index`` are
            taken over.
        topk, chunk_size: See :class:`_KNNAttention`.
    """

    taken_attributes = ('embed_dims', 'window_size', 'num_heads', 'scale')

    def init_weights(self) -> None:
        """Truncated-normal relative-position table (std 0.02), as ``WindowMSA`` does."""
        trunc_normal_(self.relative_position_bias_table, std=.02)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """k-NN attention within each window.

        Args:
            x (Tensor): Window tokens (num_windows * B, N, C).
            mask (Tensor, optional): (num_windows, N, N) shift mask, 0 where attention is
                allowed. Defaults to None.

        Returns:
            Tensor: (num_windows * B, N, C).
        """
        batch_windows, num_tokens, channels = x.shape
        head_dims = channels // self.num_heads
        qkv = self.qkv(x).reshape(batch_windows, num_tokens, 3, self.num_heads,
                                  head_dims).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(num_tokens, num_tokens, -1).permute(2, 0, 1)
        allowed = None
        if mask is not None:
            num_windows = mask.shape[0]
            # (B, num_windows, heads, N, d) so the per-window mask broadcasts over the batch.
            window_shape = (batch_windows // num_windows, num_windows, self.num_heads,
                            num_tokens, head_dims)
            query, key, value = (t.reshape(window_shape) for t in (query, key, value))
            allowed = (mask == 0).unsqueeze(1)
        out = self._attend(
            query, key, value, self.attn_drop.p, scale=self.scale, attn_bias=bias,
            attn_mask=allowed)
        out = out.reshape(batch_windows, self.num_heads, num_tokens,
                          head_dims).transpose(1, 2).reshape(batch_windows, num_tokens, channels)
        return self.proj_drop(self.proj(out))


class KNNMultiheadAttention(_KNNAttention, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose softmax runs over each query's top-k keys.

    Replaces the attention inside mmcv's ``MultiheadAttention`` and thus inside PVT's
    spatial-reduction and MiT's efficient attention. Supported: packed in-projection (equal
    embedding dims), no ``bias_k``/``bias_v``, no ``add_zero_attn``, no attention or
    key-padding mask. Attention weights are not returned.

    Args:
        attention (nn.MultiheadAttention): The module to replace; its projections are
            taken over.
        topk, chunk_size: See :class:`_KNNAttention`.
    """

    def __init__(self,
                 attention: nn.MultiheadAttention,
                 topk: TopkSpec,
                 chunk_size: Optional[int] = None) -> None:
        if not attention._qkv_same_embed_dim:
            raise TypeError('KNNMultiheadAttention does not support separate q/k/v '
                            'projections (kdim/vdim differ from embed_dim)')
        if attention.bias_k is not None or attention.add_zero_attn:
            raise TypeError('KNNMultiheadAttention does not support add_bias_kv or '
                            'add_zero_attn')
        # On the meta device: every tensor is replaced by the original's right after.
        super().__init__(
            attention.embed_dim,
            attention.num_heads,
            dropout=attention.dropout,
            bias=attention.in_proj_bias is not None,
            batch_first=attention.batch_first,
            device='meta')
        self._take_over(attention, topk, chunk_size)

    def forward(self,
                query: torch.Tensor,
                key: torch.Tensor,
                value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None,
                need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None,
                average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, None]:
        """Same call as ``nn.MultiheadAttention.forward``; returns ``(output, None)``."""
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise ValueError(
                'KNNMultiheadAttention (KVT) supports no key_padding_mask, attn_mask or '
                'is_causal; the converted backbones never pass them')
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, num_queries, embed_dims = query.shape
        head_dims = embed_dims // self.num_heads
        weights = self.in_proj_weight.chunk(3)
        biases = (None, ) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        query, key, value = (
            F.linear(t, w, b).reshape(batch, -1, self.num_heads, head_dims).transpose(1, 2)
            for t, w, b in zip((query, key, value), weights, biases))
        out = self._attend(query, key, value, self.dropout)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, num_queries, embed_dims))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


class KNNLITAttention(_KNNAttention, LITAttention):
    """LIT's global attention with k-NN selection.

    The top-k keys are chosen after scaling and after LIT's relative-position bias.

    Args:
        attention (LITAttention): The module to replace; its projections and
            relative-position table are taken over.
        topk, chunk_size: See :class:`_KNNAttention`.
    """

    def __init__(self,
                 attention: LITAttention,
                 topk: TopkSpec,
                 chunk_size: Optional[int] = None) -> None:
        # On the meta device: every tensor is replaced by the original's right after.
        with torch.device('meta'):
            super().__init__(
                attention.embed_dims,
                attention.num_heads,
                qkv_bias=attention.qkv.bias is not None,
                qk_scale=attention.scale,
                attn_drop_rate=attention.attn_drop.p,
                proj_drop_rate=attention.proj_drop.p,
                rel_pos_size=attention.rel_pos_size,
                init_cfg=attention.init_cfg)
        self._take_over(attention, topk, chunk_size)

    def forward(self, x: torch.Tensor, hw_shape: Tuple[int, int]) -> torch.Tensor:
        """k-NN attention over all tokens; see :meth:`LITAttention.forward`."""
        batch, num_tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads,
                                  channels // self.num_heads).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        bias = None
        if self.relative_position_bias_table is not None:
            bias = self.relative_position_bias(hw_shape)
        out = self._attend(
            query, key, value, self.attn_drop.p, scale=self.scale, attn_bias=bias)
        out = out.transpose(1, 2).reshape(batch, num_tokens, channels)
        return self.proj_drop(self.proj(out))


class KNNTimmAttention(_KNNAttention):
    """timm's ViT / DeiT self-attention (``timm.layers.Attention``) with k-NN selection.

    As in the authors' DeiT code (damo-cv/KVT), the class token (and DeiT's distillation
    token) is a key like any other. The top-k keys are chosen after q/k normalisation and
    scaling and after a float ``attn_mask``; keys a boolean ``attn_mask`` or ``is_causal``
    forbids are never selected. timm's options (``qk_norm``, ``scale_norm``, ``gated``,
    ``attn_head_dim``, ``dim_out``) compute as in timm.

    Args:
        attention (nn.Module): The ``timm.layers.Attention`` to replace; its ``qkv``,
            ``q_norm``, ``k_norm``, ``norm``, ``gate``, ``proj`` and dropouts are taken over.
        topk, chunk_size: See :class:`_KNNAttention`.
    """

    # timm keeps gate = None as a plain attribute unless the attention is gated (then it is
    # a submodule, already taken over, and this assigns the same object).
    taken_attributes = ('num_heads', 'head_dim', 'attn_dim', 'scale', 'gate')

    def __init__(self,
                 attention: nn.Module,
                 topk: TopkSpec,
                 chunk_size: Optional[int] = None) -> None:
        super().__init__()
        self._take_over(attention, topk, chunk_size)

    def forward(self,
                x: torch.Tensor,
                attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        """k-NN attention over all tokens, prefix tokens included.

        Args:
            x (Tensor): Tokens (B, N, C).
            attn_mask (Tensor, optional): As in timm (and ``scaled_dot_product_attention``):
                bool, True where a query may attend, or a float bias added to the logits;
                broadcastable to (B, num_heads, N, N). Defaults to None.
            is_causal (bool): Query i attends to keys 0..i only; takes precedence over
                ``attn_mask``, as in timm's unfused path. Defaults to False.

        Returns:
            Tensor: (B, N, dim_out).
        """
        batch, num_tokens, _ = x.shape
        gate = None if self.gate is None else self.gate(x).sigmoid()
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads,
                                  self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        query, key = self.q_norm(query), self.k_norm(key)
        bias = allowed = None
        if is_causal:
            allowed = torch.ones(
                num_tokens, num_tokens, dtype=torch.bool, device=x.device).tril_()
        elif attn_mask is not None and attn_mask.dtype == torch.bool:
            allowed = attn_mask
        else:
            bias = attn_mask
        out = self._attend(
            query, key, value, self.attn_drop.p, scale=self.scale, attn_bias=bias,
            attn_mask=allowed)
        out = self.norm(out.transpose(1, 2).reshape(batch, num_tokens, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


class KNNLocallyGroupedSelfAttention(_KNNBaseModule):
    """Twins-SVT's locally-grouped self-attention (mmseg's LSA) with k-NN selection.

    Each query keeps the top-k keys of its window (group). The feature map is zero-padded to
    whole windows, as in mmseg, and a padded position is never selected by a real query:
    mmseg's additive mask intends this, but it forbids padding only when both the bottom and
    the right edge are padded (``mask[:, -0:, :]`` marks the whole map when one needs no
    padding), so there mmseg's plain LSA also attends to the zero tokens and this module,
    at full k, differs from it. Padded queries (dropped from the output) attend to padded
    keys only, as in mmseg, so that every query has a key.

    Args:
        attention (nn.Module): mmseg's ``LocallyGroupedSelfAttention`` to replace; its
            ``qkv``, ``proj`` and dropouts are taken over.
        topk, chunk_size: See :class:`_KNNAttention` (keys out of the ``window_size ** 2``
            of a window).
    """

    taken_attributes = ('embed_dims', 'num_heads', 'scale', 'window_size')

    def _padded_positions_mask(self, height: int, width: int,
                               device: torch.device) -> torch.Tensor:
        """(groups, 1, ws*ws, ws*ws) bool: True where query and key are both real or both
        padding, for the feature map padded at the bottom and right to whole windows."""
        size = self.window_size
        real = torch.zeros(-(-height // size) * size, -(-width // size) * size,
                           dtype=torch.bool, device=device)
        real[:height, :width] = True
        rows, cols = real.shape[0] // size, real.shape[1] // size
        real = real.reshape(rows, size, cols, size).transpose(1, 2).reshape(
            rows * cols, 1, size * size)
        return real.unsqueeze(-1) == real.unsqueeze(-2)

    def forward(self, x: torch.Tensor, hw_shape: Tuple[int, int]) -> torch.Tensor:
        """k-NN attention within each window; see mmseg's LSA ``forward``.

        Args:
            x (Tensor): Tokens (B, H*W, C).
            hw_shape (tuple[int, int]): (H, W) of the feature map.

        Returns:
            Tensor: (B, H*W, C).
        """
        batch, num_tokens, channels = x.shape
        height, width = hw_shape
        size = self.window_size
        pad_right, pad_bottom = -width % size, -height % size
        x = F.pad(x.view(batch, height, width, channels), (0, 0, 0, pad_right, 0, pad_bottom))
        rows, cols = x.shape[1] // size, x.shape[2] // size
        windows = x.reshape(batch, rows, size, cols, size, channels).transpose(2, 3)
        # (3, B, groups, heads, ws*ws, head_dims)
        qkv = self.qkv(windows).reshape(batch, rows * cols, size * size, 3, self.num_heads,
                                        channels // self.num_heads).permute(3, 0, 1, 4, 2, 5)
        query, key, value = qkv.unbind(0)
        allowed = None
        if pad_right or pad_bottom:
            allowed = self._padded_positions_mask(height, width, x.device)
        out = self._attend(
            query, key, value, self.attn_drop.p, scale=self.scale, attn_mask=allowed)
        out = out.transpose(2, 3).reshape(batch, rows, cols, size, size, channels)
        out = out.transpose(2, 3).reshape(batch, rows * size, cols * size, channels)
        out = out[:, :height, :width].reshape(batch, num_tokens, channels)
        return self.proj_drop(self.proj(out))
