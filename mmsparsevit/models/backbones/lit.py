# Copyright (c) mmsparsevit contributors. All rights reserved.
"""LIT: Less-attention vIsion Transformer with Deformable Token Merging.

Reference: "Less is More: Pay Less Attention in Vision Transformers" (AAAI 2022),
https://arxiv.org/abs/2105.14217. Behaviour and checkpoint layouts follow the official code,
https://github.com/zhuang-group/LIT (classification models and the mmdet/mmseg backbones).
"""
import math
import re
from collections import OrderedDict
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks.transformer import PatchEmbed
from mmengine.model import BaseModule, ModuleList
from mmengine.model.weight_init import trunc_normal_

from mmsparsevit.registry import MODELS
from mmsparsevit.utils.state_dict import unwrap_state_dict
from ..layers.dtm import DeformableTokenMerging
from ..layers.lit_blocks import LITAttentionBlock, LITMLPBlock
from ..layers.shape_convert import nchw_to_nlc, nlc_to_nchw
from .base import ConvertedCheckpoint, SparseViTBackbone


class LITStage(BaseModule):
    """One LIT stage: optional DTM from the previous stage, optional absolute position
    embedding, then MLP-only or global-MSA blocks.

    Args:
        embed_dims (int): Channels of the stage.
        depth (int): Number of blocks.
        num_heads (int): Attention heads (MSA stages).
        mlp_ratio (float): FFN expansion ratio.
        has_msa (bool): Global-MSA blocks if True, MLP-only blocks otherwise.
        in_channels (int, optional): Channels of the previous stage; a DTM halves the map when
            given. Defaults to None (first stage).
        pos_embed_size (Sequence[int], optional): (h, w) of a learned absolute position
            embedding, resized bilinearly to the actual map. Defaults to None.
        rel_pos_size (Sequence[int], optional): Reference (h, w) of the relative-position
            tables of the MSA blocks. Defaults to None.
        qkv_bias (bool): Whether qkv projections have a bias. Defaults to True.
        drop_rate (float): Dropout rate. Defaults to 0.
        attn_drop_rate (float): Attention dropout rate. Defaults to 0.
        drop_path_rates (Sequence[float]): Stochastic depth rate per block. Defaults to ().
        act_cfg (dict): Activation config. Defaults to ``dict(type='GELU')``.
        norm_cfg (dict): Norm config of the blocks. Defaults to ``dict(type='LN')``.
        with_cp (bool): Checkpoint each block. Defaults to False.
        init_cfg (dict, optional): Initialization config. Defaults to None.
    """

    def __init__(self,
                 embed_dims: int,
                 depth: int,
                 num_heads: int,
                 mlp_ratio: float,
                 has_msa: bool,
                 in_channels: Optional[int] = None,
                 pos_embed_size: Optional[Sequence[int]] = None,
                 rel_pos_size: Optional[Sequence[int]] = None,
                 qkv_bias: bool = True,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rates: Sequence[float] = (),
                 act_cfg: dict = dict(type='GELU'),
                 norm_cfg: dict = dict(type='LN'),
                 with_cp: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        drop_path_rates = tuple(drop_path_rates) or (0., ) * depth
        self.downsample = None
        if in_channels is not None:
            self.downsample = DeformableTokenMerging(in_channels, embed_dims)
        self.pos_embed = None
        if pos_embed_size is not None:
            self.pos_embed = nn.Parameter(torch.zeros(1, embed_dims, *pos_embed_size))
            self.drop_after_pos = nn.Dropout(drop_rate)
        self.blocks = ModuleList()
        for index in range(depth):
            if has_msa:
                block = LITAttentionBlock(
                    embed_dims, num_heads, mlp_ratio, qkv_bias=qkv_bias,
                    rel_pos_size=rel_pos_size, drop_rate=drop_rate,
                    attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rates[index],
                    act_cfg=act_cfg, norm_cfg=norm_cfg, with_cp=with_cp)
            else:
                block = LITMLPBlock(
                    embed_dims, mlp_ratio, drop_rate=drop_rate,
                    drop_path_rate=drop_path_rates[index], act_cfg=act_cfg,
                    norm_cfg=norm_cfg, with_cp=with_cp)
            self.blocks.append(block)

    def resized_pos_embed(self, hw_shape: Tuple[int, int]) -> torch.Tensor:
        """Absolute position embedding as tokens (1, H*W, C) for an H x W map."""
        # Resized unconditionally, as the attention's relative-position table is: bilinear
        # resampling to the embedding's own size is the identity, and no branch on the map
        # size means no torch.compile recompile for it.
        return nchw_to_nlc(F.interpolate(self.pos_embed, size=hw_shape, mode='bilinear'))

    def forward(self, x: torch.Tensor,
                hw_shape: Tuple[int, int]) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Run the stage on tokens (B, N, C_in) of an (H, W) map; returns tokens and size."""
        if self.downsample is not None:
            merged = self.downsample(nlc_to_nchw(x, hw_shape))
            hw_shape = tuple(merged.shape[2:])
            x = nchw_to_nlc(merged)
        if self.pos_embed is not None:
            x = self.drop_after_pos(x + self.resized_pos_embed(hw_shape))
        for block in self.blocks:
            x = block(x, hw_shape)
        return x, hw_shape


@MODELS.register_module()
class LIT(SparseViTBackbone):
    """LIT backbone (Less-attention vIsion Transformer).

    Early stages use MLP-only blocks, late stages global multi-head self-attention; between
    stages a Deformable Token Merging layer halves the map. Two families share the class:

    - ``'tiny'`` (LIT-Ti, PVT-style): learned absolute position embeddings per stage
      (resized bilinearly), LayerNorm eps 1e-6, no output norms (as the authors' ``LIT_Ti``).
    - ``'small'``, ``'medium'``, ``'base'`` (Swin-style): relative-position-bias tables in the
      MSA blocks, resized bicubically to the feature size at run time, and LayerNorms on the
      outputs of stages 1-3 (as the authors' mmdet ``LIT``; their mmseg copy also norms
      stage 0: ``out_norms=(0, 1, 2, 3)``).

    Inputs of any size work: the 4x4 patch embedding pads the bottom/right to a multiple of 4
    and each DTM floors odd sizes, as the authors' code does (their LIT-Ti drops the remainder
    of sizes that are not multiples of 4 instead of padding).

    Args:
        arch (str | dict): ``'tiny'``, ``'small'``, ``'medium'``, ``'base'`` (or ``'ti'``,
            ``'s'``, ``'m'``, ``'b'``) or a dict with keys ``embed_dims``, ``depths``,
            ``num_heads``, ``mlp_ratios`` (one entry per stage) and optionally
            ``position_encoding`` (``'relative'`` (default) or ``'absolute'``), ``norm_eps``
            (default 1e-5) and ``out_norms`` (default ()).
            Defaults to ``'tiny'``.
        in_channels (int): Input image channels. Defaults to 3.
        pretrain_img_size (int | Sequence[int]): Image size the position embeddings and
            relative-position tables are laid out for; the authors' ImageNet models use 224,
            their COCO LIT-S/M/B 800 and their ADE20K ones 512. Defaults to 224.
        has_msa (Sequence[int]): 1 for stages with global MSA, 0 for MLP-only stages.
            Defaults to (0, 0, 1, 1).
        out_indices (Sequence[int] | int): Stages whose outputs are returned (negative
            indices count from the end). Defaults to (0, 1, 2, 3).
        out_norms (Sequence[int], optional): Stages whose outputs get a LayerNorm; None takes
            the arch's. Defaults to None.
        qkv_bias (bool): Whether qkv projections have a bias. Defaults to True.
        drop_rate (float): Dropout rate. Defaults to 0.
        attn_drop_rate (float): Attention dropout rate. Defaults to 0.
        drop_path_rate (float): Stochastic depth rate, increased linearly over blocks.
            Defaults to 0.1.
        act_cfg (dict): Activation config. Defaults to ``dict(type='GELU')``.
        frozen_stages (int): -1 freezes nothing, 0 the patch embedding, k >= 1 the patch
            embedding and stages 0..k-1 (each with its DTM, position embedding and output
            norm). Defaults to -1.
        norm_eval (bool): See :class:`SparseViTBackbone` (here: the DTMs' BatchNorms).
            Defaults to False.
        with_cp (bool): Gradient checkpointing of every block. Defaults to False.
        init_cfg (dict, optional): See :class:`SparseViTBackbone`; ``Pretrained`` takes the
            authors' ImageNet, COCO and ADE20K releases and converted or trained checkpoints,
            resized to this model; output norms they lack keep their initialisation.
            Defaults to None.
    """

    arch_zoo = {
        **dict.fromkeys(['ti', 'tiny'], dict(
            embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), num_heads=(1, 2, 5, 8),
            mlp_ratios=(8, 8, 4, 4), position_encoding='absolute', norm_eps=1e-6, out_norms=())),
        **dict.fromkeys(['s', 'small'], dict(
            embed_dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
            mlp_ratios=(4, 4, 4, 4), out_norms=(1, 2, 3))),
        **dict.fromkeys(['m', 'medium'], dict(
            embed_dims=(96, 192, 384, 768), depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
            mlp_ratios=(4, 4, 4, 4), out_norms=(1, 2, 3))),
        **dict.fromkeys(['b', 'base'], dict(
            embed_dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
            mlp_ratios=(4, 4, 4, 4), out_norms=(1, 2, 3))),
    }
    arch_defaults = {'position_encoding': 'relative', 'norm_eps': 1e-5, 'out_norms': ()}
    # ImageNet classifiers have no output norms for dense prediction.
    optional_keys = (r'norm\d+\.(weight|bias)', )
    patch_size = 4

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 in_channels: int = 3,
                 pretrain_img_size: Union[int, Sequence[int]] = 224,
                 has_msa: Sequence[int] = (0, 0, 1, 1),
                 out_indices: Union[int, Sequence[int]] = (0, 1, 2, 3),
                 out_norms: Optional[Sequence[int]] = None,
                 qkv_bias: bool = True,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 act_cfg: dict = dict(type='GELU'),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(arch, out_indices, frozen_stages, norm_eval, drop_path_rate, with_cp,
                         init_cfg)
        settings = self.arch_settings
        num_stages = self.num_stages
        self.has_msa = tuple(bool(flag) for flag in has_msa)
        if len(self.has_msa) != num_stages:
            raise ValueError(f'has_msa={tuple(has_msa)} must have one entry per stage '
                             f'({num_stages} stages)')
        self.position_encoding = settings['position_encoding']
        if self.position_encoding not in ('relative', 'absolute'):
            raise ValueError(f"arch['position_encoding'] must be 'relative' or 'absolute', "
                             f'got {self.position_encoding!r}')
        if isinstance(pretrain_img_size, int):
            pretrain_img_size = (pretrain_img_size, pretrain_img_size)
        self.pretrain_img_size = tuple(pretrain_img_size)
        grid = [size // self.patch_size for size in self.pretrain_img_size]
        norm_cfg = dict(type='LN', eps=settings['norm_eps'])

        self.patch_embed = PatchEmbed(
            in_channels=in_channels,
            embed_dims=self.num_features[0],
            conv_type='Conv2d',
            kernel_size=self.patch_size,
            stride=self.patch_size,
            padding='corner',
            norm_cfg=dict(type='LN'))
        self.drop_after_patch_embed = nn.Dropout(drop_rate)

        absolute = self.position_encoding == 'absolute'
        self.stages = ModuleList()
        for index in range(num_stages):
            stage_grid = (grid[0] // 2**index, grid[1] // 2**index)
            self.stages.append(
                LITStage(
                    embed_dims=self.num_features[index],
                    depth=settings['depths'][index],
                    num_heads=settings['num_heads'][index],
                    mlp_ratio=settings['mlp_ratios'][index],
                    has_msa=self.has_msa[index],
                    in_channels=self.num_features[index - 1] if index > 0 else None,
                    pos_embed_size=stage_grid if absolute else None,
                    rel_pos_size=None if absolute else stage_grid,
                    qkv_bias=qkv_bias,
                    drop_rate=drop_rate,
                    attn_drop_rate=attn_drop_rate,
                    drop_path_rates=self.drop_path_rates[index],
                    act_cfg=act_cfg,
                    norm_cfg=norm_cfg,
                    with_cp=with_cp))

        self.out_norms = tuple(settings['out_norms'] if out_norms is None else out_norms)
        for index in self.out_norms:
            if not 0 <= index < num_stages:
                raise ValueError(f'out_norms={self.out_norms}: stage {index} does not exist')
            if index in self.out_indices:
                self.add_module(f'norm{index}',
                                build_norm_layer(norm_cfg, self.num_features[index])[1])
        self._freeze_stages()

    def stem_modules(self) -> List[nn.Module]:
        """The patch embedding."""
        return [self.patch_embed]

    def stage_modules(self, index: int) -> List[nn.Module]:
        """Stage ``index`` (its DTM, position embedding and blocks) and its output norm."""
        norm = getattr(self, f'norm{index}', None)
        return [self.stages[index]] + ([norm] if norm is not None else [])

    def init_default_weights(self) -> None:
        """Linears and LayerNorms as in the base, truncated-normal position embeddings; the
        DTMs and relative-position tables initialise themselves (their ``init_weights``)."""
        super().init_default_weights()
        for stage in self.stages:
            if stage.pos_embed is not None:
                trunc_normal_(stage.pos_embed, std=.02)

    def convert_state_dict(self, checkpoint: Mapping) -> ConvertedCheckpoint:
        """:func:`convert_lit_checkpoint`, then absolute position embeddings (bilinear) and
        relative-position tables (bicubic) resized to this model's ``pretrain_img_size``.

        Returns:
            tuple[OrderedDict[str, Tensor], dict[str, str]]: The state dict, and notes: the
            converter's dropped keys and each resized key with its old and new shape.

        Raises:
            ValueError: Not a LIT checkpoint, or a relative-position table that is not square.
        """
        state_dict, notes = convert_lit_checkpoint(checkpoint)
        own = self.state_dict()
        result = OrderedDict(state_dict)
        for key, value in state_dict.items():
            if key not in own or own[key].shape == value.shape:
                continue
            target = own[key].shape
            if key.endswith('.pos_embed') and value.dim() == 4 and value.shape[:2] == target[:2]:
                mode = 'bilinear'
                result[key] = F.interpolate(value.float(), size=tuple(target[2:]),
                                            mode=mode).to(value.dtype)
            elif (key.endswith('.relative_position_bias_table') and value.dim() == 2
                  and value.shape[1] == target[1]):
                mode = 'bicubic'
                module = self.get_submodule(key.rsplit('.', 1)[0])
                ref_h, ref_w = module.rel_pos_size
                side = math.isqrt(value.shape[0])
                if side * side != value.shape[0]:
                    raise ValueError(f'{key}: cannot resize a non-square table of '
                                     f'{value.shape[0]} entries')
                grid = nlc_to_nchw(value.float()[None], (side, side))
                grid = F.interpolate(grid, size=(2 * ref_h - 1, 2 * ref_w - 1), mode=mode)
                result[key] = nchw_to_nlc(grid)[0].to(value.dtype)
            else:
                continue
            notes[key] = (f'resized {tuple(value.shape)} -> {tuple(target)} ({mode}): laid '
                          'out for another input size than the model (pretrain_img_size)')
        return result, notes

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Return the maps (B, C_i, H_i, W_i) of the stages in ``out_indices``."""
        x, hw_shape = self.patch_embed(x)
        hw_shape = tuple(hw_shape)
        x = self.drop_after_patch_embed(x)
        outs = []
        for index, stage in enumerate(self.stages):
            x, hw_shape = stage(x, hw_shape)
            if index in self.out_indices:
                out = x
                if hasattr(self, f'norm{index}'):
                    out = getattr(self, f'norm{index}')(out)
                outs.append(nlc_to_nchw(out, hw_shape).contiguous())
        return tuple(outs)


# Official key patterns (regex on the stripped key) -> mmsparsevit keys. The block-local part
# is shared by both families; ``{norm2}`` becomes ``norm2`` in MSA blocks and ``norm`` in
# MLP-only blocks, which have no norm1.
_BLOCK_RULES = (
    (r'norm1\.(weight|bias)', r'norm1.\1'),
    (r'attn\.(qkv|proj)\.(weight|bias)', r'attn.\1.\2'),
    (r'attn\.relative_position_bias_table', 'attn.relative_position_bias_table'),
    (r'norm2\.(weight|bias)', r'{norm2}.\1'),
    (r'mlp\.fc1\.(weight|bias)', r'ffn.layers.0.0.\1'),
    (r'mlp\.fc2\.(weight|bias)', r'ffn.layers.1.\1'),
)
_DTM_RULES = (
    (r'dconv\.(weight|bias)', r'\1'),
    (r'dconv\.conv_offset\.(weight|bias)', r'conv_offset.\1'),
    (r'norm_layer\.(weight|bias|running_mean|running_var|num_batches_tracked)', r'norm.\1'),
)
_CLASSIFIER_ONLY = {
    'head.weight': 'classification head',
    'head.bias': 'classification head',
    'norm.weight': 'final norm of the classifier',
    'norm.bias': 'final norm of the classifier',
    'cls_token': 'class token of the classifier',
}


def _match_rules(rules, suffix: str) -> Optional[str]:
    for pattern, replacement in rules:
        match = re.fullmatch(pattern, suffix)
        if match:
            return match.expand(replacement)
    return None


def convert_lit_checkpoint(checkpoint: Mapping) -> ConvertedCheckpoint:
    """Convert an official LIT checkpoint to mmsparsevit's ``LIT`` layout.

    Accepts the ImageNet releases (``lit_ti.pth``: PVT-style keys ``patch_embed1..4``,
    ``pos_embed1..4``, ``block1..4``; ``lit_s/m/b.pth``: Swin-style keys ``patch_embed``,
    ``layers.i``), the authors' COCO/ADE20K releases (keys under ``backbone.``, other modules
    ignored) and checkpoints already in mmsparsevit's layout (returned unchanged). Only
    renames and reshapes: position parameters are resized to a model by
    :meth:`LIT.convert_state_dict`.

    Args:
        checkpoint (Mapping): A loaded checkpoint or state dict (under ``state_dict`` or
            ``model``; a ``module.`` prefix is removed).

    Returns:
        tuple[OrderedDict[str, Tensor], dict[str, str]]: The converted state dict, and the
        official keys not carried over
        mapped to the reason (classification head, classifier-only norm/class token, the
        ``relative_position_index`` buffers and the class-token row of ``pos_embed4``, which
        are recomputed or unused).

    Raises:
        TypeError: If ``checkpoint`` is not a mapping.
        ValueError: If the checkpoint is not a LIT checkpoint or has keys no rule explains
            (they are named).
    """
    state_dict = unwrap_state_dict(checkpoint)
    if any(key.startswith('backbone.') for key in state_dict):
        state_dict = OrderedDict((key[len('backbone.'):], value)
                                 for key, value in state_dict.items()
                                 if key.startswith('backbone.'))
    if 'patch_embed.projection.weight' in state_dict:
        return OrderedDict(state_dict), {}
    if 'patch_embed1.proj.weight' in state_dict:
        stage_rules = _tiny_stage_key
    elif 'patch_embed.proj.weight' in state_dict:
        stage_rules = _swin_stage_key
    else:
        raise ValueError('not a LIT checkpoint: found neither patch_embed1.proj.weight '
                         '(LIT-Ti) nor patch_embed.proj.weight (LIT-S/M/B); first keys: '
                         f'{list(state_dict)[:5]}')
    converted, dropped, unknown = OrderedDict(), OrderedDict(), []
    for key, value in state_dict.items():
        if key in _CLASSIFIER_ONLY:
            dropped[key] = _CLASSIFIER_ONLY[key]
            continue
        if key.endswith('attn.relative_position_index'):
            dropped[key] = 'buffer, recomputed for the actual feature size'
            continue
        match = re.fullmatch(r'patch_embed1?\.(proj|norm)\.(weight|bias)', key)
        if match:
            part = 'projection' if match.group(1) == 'proj' else 'norm'
            converted[f'patch_embed.{part}.{match.group(2)}'] = value
            continue
        match = re.fullmatch(r'norm(\d)\.(weight|bias)', key)
        if match:
            converted[key] = value
            continue
        new_key = stage_rules(key, state_dict)
        if new_key is None:
            unknown.append(key)
            continue
        if key.startswith('pos_embed'):
            value, dropped_row = _pos_embed_to_grid(key, value)
            if dropped_row:
                dropped[f'{key}[:, 0]'] = 'class-token position, unused by dense prediction'
        converted[new_key] = value
    if unknown:
        raise ValueError(f'unrecognised LIT checkpoint keys: {unknown}')
    return converted, dict(dropped)


def _tiny_stage_key(key: str, state_dict: dict) -> Optional[str]:
    match = re.fullmatch(r'pos_embed(\d)', key)
    if match:
        return f'stages.{int(match.group(1)) - 1}.pos_embed'
    match = re.fullmatch(r'patch_embed(\d)\.(.+)', key)
    if match and int(match.group(1)) > 1:
        suffix = _match_rules(_DTM_RULES, match.group(2))
        return suffix and f'stages.{int(match.group(1)) - 1}.downsample.{suffix}'
    match = re.fullmatch(r'block(\d)\.(\d+)\.(.+)', key)
    if match:
        stage, block = int(match.group(1)), match.group(2)
        has_norm1 = f'block{stage}.{block}.norm1.weight' in state_dict
        suffix = _match_rules(_BLOCK_RULES, match.group(3))
        return suffix and (f'stages.{stage - 1}.blocks.{block}.' +
                           suffix.replace('{norm2}', 'norm2' if has_norm1 else 'norm'))
    return None


def _swin_stage_key(key: str, state_dict: dict) -> Optional[str]:
    match = re.fullmatch(r'layers\.(\d+)\.downsample\.(.+)', key)
    if match:
        suffix = _match_rules(_DTM_RULES, match.group(2))
        return suffix and f'stages.{int(match.group(1)) + 1}.downsample.{suffix}'
    match = re.fullmatch(r'layers\.(\d+)\.blocks\.(\d+)\.(.+)', key)
    if match:
        stage, block = match.group(1), match.group(2)
        has_norm1 = f'layers.{stage}.blocks.{block}.norm1.weight' in state_dict
        suffix = _match_rules(_BLOCK_RULES, match.group(3))
        return suffix and (f'stages.{stage}.blocks.{block}.' +
                           suffix.replace('{norm2}', 'norm2' if has_norm1 else 'norm'))
    return None


def _pos_embed_to_grid(key: str, value: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """(1, N, C) tokens of a square grid -> (1, C, s, s); a leading class-token row (N = s^2
    + 1, the authors' ``pos_embed4``) is dropped."""
    if value.dim() != 3 or value.shape[0] != 1:
        raise ValueError(f'{key}: expected shape (1, N, C), got {tuple(value.shape)}')
    num_tokens = value.shape[1]
    dropped_row = math.isqrt(num_tokens)**2 != num_tokens
    if dropped_row:
        value = value[:, 1:]
        num_tokens -= 1
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f'{key}: {value.shape[1]} positions do not form a square grid')
    return nlc_to_nchw(value, (side, side)), dropped_row
