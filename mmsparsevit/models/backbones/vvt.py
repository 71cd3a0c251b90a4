# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Vicinity Vision Transformer (VVT) backbone for dense prediction."""
import math
import re
from collections import OrderedDict
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import torch
from mmcv.cnn import build_activation_layer, build_norm_layer
from mmcv.cnn.bricks.drop import build_dropout
from mmcv.cnn.bricks.transformer import PatchEmbed
from mmengine.model import BaseModule, ModuleList
from mmengine.model.weight_init import normal_init
from torch import Tensor, nn

from mmsparsevit.registry import MODELS
from mmsparsevit.utils.state_dict import unwrap_state_dict
from ..layers.checkpointed_block import CheckpointedBlock
from ..layers.gelu_linear import gelu_linear
from ..layers.shape_convert import nchw_to_nlc, nlc_to_nchw
from ..layers.vicinity_attention import VicinityAttention
from .base import ConvertedCheckpoint, SparseViTBackbone


class VVTFFN(BaseModule):
    """Feed-forward network with a depth-wise 3x3 convolution between the linears.

    Args:
        embed_dims (int): Input and output channels.
        hidden_dims (int): Hidden channels.
        act_cfg (dict): Activation config. Defaults to dict(type='GELU').
        init_cfg (dict, optional): Initialization config. Defaults to None.
    """

    def __init__(self,
                 embed_dims: int,
                 hidden_dims: int,
                 act_cfg: dict = dict(type='GELU'),
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.fc1 = nn.Linear(embed_dims, hidden_dims)
        self.dwconv = nn.Conv2d(hidden_dims, hidden_dims, 3, padding=1, groups=hidden_dims)
        self.act = build_activation_layer(act_cfg)
        self.fc2 = nn.Linear(hidden_dims, embed_dims)

    def forward(self, x: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        """Map (B, N, C) tokens of an ``hw_shape`` map to (B, N, C) tokens."""
        # The hidden tokens (B, N, hidden) are handed to the depth-wise convolution as a
        # channels-last view of the (B, hidden, H, W) map, which oneDNN keeps channels-last
        # through the convolution and the activation: no layout copy on either side, and
        # oneDNN's channels-last depth-wise kernel instead of its slower channel-major one.
        hidden = self.dwconv(nlc_to_nchw(self.fc1(x), hw_shape))
        if not isinstance(self.act, nn.GELU):
            return self.fc2(nchw_to_nlc(self.act(hidden)))
        if hidden.requires_grad:
            # Backward reuses the activation's storage for two of its gradients.
            return gelu_linear(nchw_to_nlc(hidden), self.fc2.weight, self.fc2.bias,
                               self.act.approximate)
        # Where autograd keeps nothing, the activation overwrites the convolution's output:
        # at stage 1 a fresh tensor of that size is larger than the allocator keeps cached,
        # so each one costs a round of page faults.
        hidden = torch.ops.aten.gelu_(hidden, approximate=self.act.approximate)
        return self.fc2(nchw_to_nlc(hidden))


class VVTBlock(CheckpointedBlock):
    """Pre-norm block: vicinity attention then the convolutional FFN.

    Args:
        embed_dims (int): Token channels.
        num_heads (int): Attention heads.
        mlp_ratio (float): Hidden/embed channel ratio of the FFN.
        feature_reduction (int): Channel reduction of q, k, v. Defaults to 2.
        se_ratio (int): Reduction in the feature-preserving gate. Defaults to 1.
        position_form (str): 'sum' or 'product'. Defaults to 'sum'.
        drop_path_rate (float): Stochastic depth rate. Defaults to 0.
        norm_cfg (dict): Norm config. Defaults to dict(type='LN', eps=1e-6).
        act_cfg (dict): Activation config. Defaults to dict(type='GELU').
        with_cp (bool), init_cfg (dict, optional): As for :class:`CheckpointedBlock`.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 mlp_ratio: float,
                 feature_reduction: int = 2,
                 se_ratio: int = 1,
                 position_form: str = 'sum',
                 drop_path_rate: float = 0.,
                 norm_cfg: dict = dict(type='LN', eps=1e-6),
                 act_cfg: dict = dict(type='GELU'),
                 with_cp: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(with_cp=with_cp, init_cfg=init_cfg)
        self.norm1 = build_norm_layer(norm_cfg, embed_dims)[1]
        self.attn = VicinityAttention(
            embed_dims,
            num_heads,
            feature_reduction=feature_reduction,
            se_ratio=se_ratio,
            position_form=position_form)
        self.norm2 = build_norm_layer(norm_cfg, embed_dims)[1]
        self.ffn = VVTFFN(embed_dims, int(embed_dims * mlp_ratio), act_cfg=act_cfg)
        self.drop_path = nn.Identity() if drop_path_rate <= 0 else build_dropout(
            dict(type='DropPath', drop_prob=drop_path_rate))

    def block_forward(self, x: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        """Tokens (B, N, C) of an (H, W) = ``hw_shape`` map in and out."""
        x = x + self.drop_path(self.attn(self.norm1(x), hw_shape))
        return x + self.drop_path(self.ffn(self.norm2(x), hw_shape))


class VVTStage(BaseModule):
    """Overlapping patch embedding, a sequence of VVT blocks and a LayerNorm.

    Args:
        in_channels (int): Channels of the input map.
        embed_dims (int): Token channels of the stage.
        patch_size (int): Kernel of the patch-embedding convolution.
        stride (int): Stride of the patch-embedding convolution.
        block_cfg (dict): Keyword arguments shared by the blocks.
        drop_path_rates (Sequence[float]): Stochastic depth rate of each block, one block
            per entry.
        norm_cfg (dict): Norm config of the blocks and the stage output.
            Defaults to dict(type='LN', eps=1e-6).
        init_cfg (dict, optional): Initialization config. Defaults to None.
    """

    def __init__(self,
                 in_channels: int,
                 embed_dims: int,
                 patch_size: int,
                 stride: int,
                 block_cfg: dict,
                 drop_path_rates: Sequence[float],
                 norm_cfg: dict = dict(type='LN', eps=1e-6),
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        # The released models normalise patch embeddings with LayerNorm's default eps.
        self.patch_embed = PatchEmbed(
            in_channels=in_channels,
            embed_dims=embed_dims,
            kernel_size=patch_size,
            stride=stride,
            padding=patch_size // 2,
            norm_cfg=dict(type='LN'))
        self.blocks = ModuleList([
            VVTBlock(embed_dims, drop_path_rate=rate, norm_cfg=norm_cfg, **block_cfg)
            for rate in drop_path_rates
        ])
        self.norm = build_norm_layer(norm_cfg, embed_dims)[1]

    def forward(self, x: Tensor) -> Tensor:
        """Map (B, C_in, H, W) to the normalised stage output (B, C, H', W')."""
        x, hw_shape = self.patch_embed(x)
        for block in self.blocks:
            x = block(x, hw_shape)
        return nlc_to_nchw(self.norm(x), hw_shape).contiguous()


@MODELS.register_module()
class VVT(SparseViTBackbone):
    """Vicinity Vision Transformer.

    A PVTv2-style pyramid of four stages (overlapping patch embeddings 7x7/4 then
    3x3/2) whose blocks use vicinity attention, a linear attention with a 2-D
    Manhattan-distance locality prior computed in a reduced feature space
    (:class:`~mmsparsevit.models.layers.VicinityAttention`). Each stage ends with
    a LayerNorm whose output is the stage's feature map.

    Paper: `Vicinity Vision Transformer <https://arxiv.org/abs/2206.10552>`_
    (TPAMI 2023). Inspiration from
    https://github.com/OpenNLPLab/Vicinity-Vision-Transformer

    Args:
        arch (str | dict): A preset name (``'tiny'``, ``'small'``, ``'medium'``,
            ``'large'`` or ``'t'``, ``'s'``, ``'m'``, ``'l'``) or a dict with the keys

            - **embed_dims** (Sequence[int]): channels of each stage.
            - **depths** (Sequence[int]): blocks of each stage.
            - **num_heads** (Sequence[int]): attention heads of each stage.
            - **mlp_ratios** (Sequence[float]): FFN hidden/embed ratio of each stage.
            - **feature_reductions** (Sequence[int], optional): q/k/v channel
              reduction of each stage; 2 for every stage if absent.
            - **se_ratios** (Sequence[int], optional): reduction in the
              feature-preserving gate of each stage; 1 if absent.

            Defaults to 'tiny'.
        in_channels (int): Channels of the input image. Defaults to 3.
        out_indices (Sequence[int] | int): Stages whose outputs are returned
            (negative indices count from the end). Defaults to (0, 1, 2, 3).
        frozen_stages (int): ``-1`` freezes nothing, ``0`` the stem (the first
            patch embedding), ``k > 0`` the first ``k`` stages. Defaults to -1.
        norm_eval (bool): See :class:`SparseViTBackbone`; VVT's LayerNorms have no
            running statistics and are not affected. Defaults to False.
        drop_path_rate (float): Stochastic depth rate, increased linearly over the
            blocks. Defaults to 0.1.
        with_cp (bool): Activation checkpointing per block (saves memory, costs a
            second forward). Defaults to False.
        position_form (str): Vicinity term ``'sum'`` (released models) or
            ``'product'``. Defaults to 'sum'.
        norm_cfg (dict): Norm of the blocks and stage outputs.
            Defaults to dict(type='LN', eps=1e-6).
        act_cfg (dict): FFN activation. Defaults to dict(type='GELU').
        init_cfg (dict, optional): See :class:`SparseViTBackbone`; ``Pretrained``
            takes an official release or a converted checkpoint. Defaults to None.

    Examples:
        >>> import torch
        >>> from mmsparsevit.models import VVT
        >>> model = VVT(arch='tiny').eval()
        >>> outs = model(torch.rand(1, 3, 112, 137))
        >>> [tuple(out.shape) for out in outs]
        [(1, 96, 28, 35), (1, 160, 14, 18), (1, 320, 7, 9), (1, 512, 4, 5)]
    """

    arch_zoo = {
        **dict.fromkeys(['t', 'tiny'], dict(embed_dims=(96, 160, 320, 512), depths=(2, 2, 2, 2),
                                            num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4))),
        **dict.fromkeys(['s', 'small'], dict(embed_dims=(96, 160, 320, 512), depths=(3, 3, 9, 3),
                                             num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4))),
        **dict.fromkeys(['m', 'medium'], dict(embed_dims=(96, 160, 320, 512),
                                              depths=(3, 3, 27, 3), num_heads=(1, 2, 5, 8),
                                              mlp_ratios=(8, 8, 4, 4))),
        **dict.fromkeys(['l', 'large'], dict(embed_dims=(96, 160, 320, 512), depths=(4, 4, 36, 4),
                                             num_heads=(1, 2, 5, 8), mlp_ratios=(4, 4, 4, 4))),
    }
    arch_stage_defaults = {'feature_reductions': 2, 'se_ratios': 1}

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 in_channels: int = 3,
                 out_indices: Union[int, Sequence[int]] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 drop_path_rate: float = 0.1,
                 with_cp: bool = False,
                 position_form: str = 'sum',
                 norm_cfg: dict = dict(type='LN', eps=1e-6),
                 act_cfg: dict = dict(type='GELU'),
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(arch, out_indices, frozen_stages, norm_eval, drop_path_rate, with_cp,
                         init_cfg)
        self.in_channels = in_channels
        settings = self.arch_settings
        self.stages = ModuleList()
        for i in range(self.num_stages):
            block_cfg = dict(
                num_heads=settings['num_heads'][i],
                mlp_ratio=settings['mlp_ratios'][i],
                feature_reduction=settings['feature_reductions'][i],
                se_ratio=settings['se_ratios'][i],
                position_form=position_form,
                act_cfg=act_cfg,
                with_cp=with_cp)
            self.stages.append(
                VVTStage(
                    self.num_features[i - 1] if i else in_channels,
                    self.num_features[i],
                    patch_size=7 if i == 0 else 3,
                    stride=4 if i == 0 else 2,
                    block_cfg=block_cfg,
                    drop_path_rates=self.drop_path_rates[i],
                    norm_cfg=norm_cfg))
        self._freeze_stages()

    def stem_modules(self) -> List[nn.Module]:
        """The first patch embedding."""
        return [self.stages[0].patch_embed]

    def stage_modules(self, index: int) -> List[nn.Module]:
        """Patch embedding, blocks and output norm of stage ``index``."""
        return [self.stages[index]]

    def init_default_weights(self) -> None:
        """Linears and LayerNorms as in the base, convolutions normal with fan-out variance
        (the authors' ``_init_weights``)."""
        super().init_default_weights()
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = math.prod(module.kernel_size) * module.out_channels // module.groups
                normal_init(module, mean=0., std=(2.0 / fan_out)**0.5, bias=0.)

    def convert_state_dict(self, checkpoint: Mapping) -> ConvertedCheckpoint:
        """:func:`convert_vvt_checkpoint`: no VVT parameter depends on the input size."""
        return convert_vvt_checkpoint(checkpoint)

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """Return the normalised outputs of the stages in ``out_indices``.

        Args:
            x (Tensor): Images of shape (B, in_channels, H, W), any H, W >= 1.

        Returns:
            tuple[Tensor]: (B, C_i, H_i, W_i) maps with strides 4, 8, 16, 32
            (sizes rounded up: ``H_1 = ceil(H / 4)``, then halved rounding up).
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f'VVT expects images of shape (B, {self.in_channels}, H, W) '
                             f'(in_channels={self.in_channels}), got {tuple(x.shape)}')
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(x)
            if i == self.out_indices[-1]:
                break
        return tuple(outs)


_OFFICIAL_KEY_RULES = (
    (re.compile(r'^patch_embed(\d+)\.proj\.(weight|bias)$'),
     lambda m: f'stages.{int(m[1]) - 1}.patch_embed.projection.{m[2]}'),
    (re.compile(r'^patch_embed(\d+)\.norm\.(weight|bias)$'),
     lambda m: f'stages.{int(m[1]) - 1}.patch_embed.norm.{m[2]}'),
    (re.compile(r'^block(\d+)\.(\d+)\.(norm1|norm2)\.(weight|bias)$'),
     lambda m: f'stages.{int(m[1]) - 1}.blocks.{m[2]}.{m[3]}.{m[4]}'),
    (re.compile(r'^block(\d+)\.(\d+)\.attn\.([qkv]_proj|out_proj)\.(weight|bias)$'),
     lambda m: f'stages.{int(m[1]) - 1}.blocks.{m[2]}.attn.{m[3]}.{m[4]}'),
    (re.compile(r'^block(\d+)\.(\d+)\.attn\.se_fc\.([02])\.weight$'),
     lambda m: f'stages.{int(m[1]) - 1}.blocks.{m[2]}.attn.'
     f'{"se_reduce" if m[3] == "0" else "se_expand"}.weight'),
    (re.compile(r'^block(\d+)\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$'),
     lambda m: f'stages.{int(m[1]) - 1}.blocks.{m[2]}.ffn.{m[3]}.{m[4]}'),
    (re.compile(r'^block(\d+)\.(\d+)\.mlp\.dwconv\.dwconv\.(weight|bias)$'),
     lambda m: f'stages.{int(m[1]) - 1}.blocks.{m[2]}.ffn.dwconv.{m[3]}'),
    (re.compile(r'^norm(\d+)\.(weight|bias)$'), lambda m: f'stages.{int(m[1]) - 1}.norm.{m[2]}'),
)


def convert_vvt_checkpoint(checkpoint: Mapping) -> ConvertedCheckpoint:
    """Convert an official VVT checkpoint to the :class:`VVT` key layout.

    Pure function: the input is not modified and no file is read.

    Args:
        checkpoint (Mapping): The authors' state dict, at the top level or under
            ``'model'`` / ``'state_dict'``; a ``module.`` prefix (DataParallel) is
            removed. A state dict already in this package's layout is returned with the
            same keys.

    Returns:
        tuple[OrderedDict[str, Tensor], dict[str, str]]: The state dict loadable by
        :class:`VVT`, and the keys not carried over (the ImageNet head ``head.*``) mapped
        to the reason.

    Raises:
        TypeError: If ``checkpoint`` is not a mapping.
        ValueError: If a key is neither an official VVT key nor one of ours, e.g. the
            checkpoint of another architecture (the keys are named).
    """
    converted, dropped, unknown = OrderedDict(), {}, []
    for key, value in unwrap_state_dict(checkpoint).items():
        if key.startswith('head.'):
            dropped[key] = 'classification head'
            continue
        if key.startswith('stages.'):
            converted[key] = value
            continue
        for pattern, rename in _OFFICIAL_KEY_RULES:
            match = pattern.match(key)
            if match:
                converted[rename(match)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f'not a VVT checkpoint: {len(unknown)} unrecognised keys, e.g. '
                         f'{unknown[:8]}')
    return converted, dropped
