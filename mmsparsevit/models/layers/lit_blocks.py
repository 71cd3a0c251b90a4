# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Transformer blocks of LIT: MLP-only blocks (early stages) and global-MSA blocks (late)."""
import copy
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks.drop import build_dropout
from mmcv.cnn.bricks.transformer import FFN

from .checkpointed_block import CheckpointedBlock
from .gelu_linear import gelu_linear
from .lit_attention import LITAttention


class _ResidualFFN(FFN):
    """mmcv's two-layer FFN (its modules and state-dict keys) whose activation and second
    linear run as :func:`gelu_linear` when nothing lies between them: a GELU, and no
    dropout at work."""

    def forward(self, x: torch.Tensor, identity: Optional[torch.Tensor] = None) -> torch.Tensor:
        (fc1, act, hidden_drop), fc2, out_drop = self.layers
        dropout_at_work = self.training and (hidden_drop.p > 0 or out_drop.p > 0)
        if (not isinstance(act, nn.GELU) or dropout_at_work
                or not isinstance(self.gamma2, nn.Identity) or not self.add_identity):
            return super().forward(x, identity)
        out = gelu_linear(fc1(x), fc2.weight, fc2.bias, act.approximate)
        return (x if identity is None else identity) + self.dropout_layer(out)


def _residual_ffn(embed_dims: int, mlp_ratio: float, drop_rate: float, drop_path_rate: float,
                  act_cfg: dict) -> FFN:
    """Two-layer FFN that adds its input back through DropPath (the authors' ``Mlp``)."""
    return _ResidualFFN(
        embed_dims=embed_dims,
        feedforward_channels=int(embed_dims * mlp_ratio),
        num_fcs=2,
        ffn_drop=drop_rate,
        dropout_layer=dict(type='DropPath', drop_prob=drop_path_rate),
        act_cfg=act_cfg,
        add_identity=True)


class LITMLPBlock(CheckpointedBlock):
    """Pre-norm MLP block without attention: ``x + DropPath(FFN(LN(x)))``.

    Args:
        embed_dims (int): Token channels.
        mlp_ratio (float): Hidden channels of the FFN over ``embed_dims``.
        drop_rate (float): Dropout inside the FFN. Defaults to 0.
        drop_path_rate (float): Stochastic depth rate of the residual branch. Defaults to 0.
        act_cfg, norm_cfg (dict): FFN activation and norm. Defaults to GELU and LN.
        with_cp (bool), init_cfg (dict, optional): As for :class:`CheckpointedBlock`.
    """

    # The name of the FFN branch's norm: the authors' (and their checkpoints') ``norm`` in
    # MLP-only blocks, ``norm2`` in attention blocks.
    ffn_norm_name = 'norm'

    def __init__(self,
                 embed_dims: int,
                 mlp_ratio: float,
                 drop_rate: float = 0.,
                 drop_path_rate: float = 0.,
                 act_cfg: dict = dict(type='GELU'),
                 norm_cfg: dict = dict(type='LN'),
                 with_cp: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(with_cp=with_cp, init_cfg=init_cfg)
        self.add_module(self.ffn_norm_name, build_norm_layer(norm_cfg, embed_dims)[1])
        self.ffn = _residual_ffn(embed_dims, mlp_ratio, drop_rate, drop_path_rate, act_cfg)

    def ffn_branch(self, x: torch.Tensor) -> torch.Tensor:
        """``x + DropPath(FFN(LN(x)))``."""
        return self.ffn(getattr(self, self.ffn_norm_name)(x), identity=x)

    def block_forward(self, x: torch.Tensor, hw_shape: Tuple[int, int]) -> torch.Tensor:
        """Tokens (B, N, C) in and out; ``hw_shape`` is unused (the uniform block API)."""
        return self.ffn_branch(x)


class LITAttentionBlock(LITMLPBlock):
    """Pre-norm transformer block with global MSA:
    ``x + DropPath(MSA(LN(x)))`` then the FFN branch of :class:`LITMLPBlock`.

    Args:
        embed_dims (int): Token channels.
        num_heads (int): Attention heads.
        mlp_ratio (float): Hidden channels of the FFN over ``embed_dims``.
        qkv_bias (bool): Whether the qkv projection has a bias. Defaults to True.
        rel_pos_size (Sequence[int], optional): Reference (h, w) of the relative-position
            table; None for no relative bias. Defaults to None.
        drop_rate (float): Dropout after projections and inside the FFN. Defaults to 0.
        attn_drop_rate (float): Dropout on attention weights. Defaults to 0.
        drop_path_rate (float): Stochastic depth rate of both branches. Defaults to 0.
        **kwargs: ``act_cfg``, ``norm_cfg``, ``with_cp``, ``init_cfg`` of :class:`LITMLPBlock`.
    """

    ffn_norm_name = 'norm2'

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 mlp_ratio: float,
                 qkv_bias: bool = True,
                 rel_pos_size: Optional[Sequence[int]] = None,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.,
                 **kwargs) -> None:
        super().__init__(embed_dims, mlp_ratio, drop_rate=drop_rate,
                         drop_path_rate=drop_path_rate, **kwargs)
        # The attention branch's norm is configured as the FFN branch's.
        self.norm1 = copy.deepcopy(self.norm2)
        self.attn = LITAttention(
            embed_dims,
            num_heads,
            qkv_bias=qkv_bias,
            attn_drop_rate=attn_drop_rate,
            proj_drop_rate=drop_rate,
            rel_pos_size=rel_pos_size)
        self.drop_path = build_dropout(dict(type='DropPath', drop_prob=drop_path_rate))

    def block_forward(self, x: torch.Tensor, hw_shape: Tuple[int, int]) -> torch.Tensor:
        """Tokens (B, N, C) of an (H, W) = ``hw_shape`` map in and out."""
        return self.ffn_branch(x + self.drop_path(self.attn(self.norm1(x), hw_shape)))
