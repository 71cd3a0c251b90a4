# Copyright (c) mmsparsevit contributors. All rights reserved.
"""KVT: wrap an existing transformer backbone so that its self-attention is k-NN attention.

Paper: "KVT: k-NN Attention for Boosting Vision Transformers" (ECCV 2022,
https://arxiv.org/abs/2106.00515); the authors' code (damo-cv/KVT) covers DeiT only.

``KVT`` builds the inner backbone from its own config and changes the class of each of its
attention modules to a subclass whose ``forward`` uses :func:`knn_attention`. The modules keep
their parameters, buffers, names and every other method, so the result *is* the inner backbone
(same type, parameters and state-dict keys): ImageNet checkpoints, detectors trained with the
plain backbone and the inner backbone's ``init_cfg`` all load unchanged.
"""
import sys
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.logging import print_log
from mmengine.registry import Registry

from mmsparsevit.registry import MODELS
from ..layers.knn_attention import TopkSpec, knn_attention, topk_per_stage
from ..layers.lit_attention import LITAttention


def _module_knn_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, dropout: Union[nn.Dropout, float],
                          **kwargs) -> torch.Tensor:
    """:func:`knn_attention` with a converted module's top-k, chunking and attention dropout
    (``dropout``: its ``nn.Dropout`` or probability; not applied in eval mode)."""
    dropout_p = 0.0
    if module.training:
        dropout_p = dropout.p if isinstance(dropout, nn.Dropout) else float(dropout)
    return knn_attention(
        query,
        key,
        value,
        module.knn_topk,
        dropout_p=dropout_p,
        chunk_size=module.knn_chunk_size,
        **kwargs)


def _knn_extra_repr(self) -> str:
    base = type(self).__mro__[1].extra_repr(self)
    return ', '.join(filter(None, [base, f'knn_topk={self.knn_topk!r}']))


def _window_msa_forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
    """k-NN forward of mmdet's / mmseg's ``WindowMSA`` (Swin window attention).

    Selection happens after scaling and after the relative-position bias; pairs the shifted-
    window mask forbids (any nonzero mask value; Swin uses -100) are never selected.

    Args:
        x (Tensor): Window tokens (num_windows * B, N, C).
        mask (Tensor, optional): (num_windows, N, N) shift mask, 0 where attention is
            allowed. Defaults to None.
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
        window_shape = (batch_windows // num_windows, num_windows, self.num_heads, num_tokens,
                        head_dims)
        query, key, value = (t.reshape(window_shape) for t in (query, key, value))
        allowed = (mask == 0).unsqueeze(1)
    out = _module_knn_attention(
        self, query, key, value, self.attn_drop, scale=self.scale, attn_bias=bias,
        attn_mask=allowed)
    out = out.reshape(batch_windows, self.num_heads, num_tokens,
                      head_dims).transpose(1, 2).reshape(batch_windows, num_tokens, channels)
    return self.proj_drop(self.proj(out))


class KNNMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose softmax runs over each query's top-k keys.

    Instances are made by changing the class of an existing ``nn.MultiheadAttention`` (the
    attention inside mmcv's ``MultiheadAttention`` and thus inside PVT's spatial-reduction and
    MiT's efficient attention), so parameters and state-dict keys are those of the original.
    Supported: packed in-projection (equal embedding dims), no ``bias_k``/``bias_v``, no
    ``add_zero_attn``, no attention or key-padding mask. Attention weights are not returned.
    """

    knn_topk: TopkSpec
    knn_chunk_size: Optional[int]

    @staticmethod
    def unsupported_reason(module: nn.MultiheadAttention) -> Optional[str]:
        """Why ``module`` cannot become k-NN attention, or None if it can."""
        if not module._qkv_same_embed_dim:
            return 'separate q/k/v projections (kdim/vdim differ from embed_dim)'
        if module.bias_k is not None or module.add_zero_attn:
            return 'add_bias_kv / add_zero_attn'
        return None

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
                'is_causal; the wrapped backbones never pass them')
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, num_queries, embed_dims = query.shape
        head_dims = embed_dims // self.num_heads
        weights = self.in_proj_weight.chunk(3)
        biases = (None, ) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        query, key, value = (
            F.linear(t, w, b).reshape(batch, -1, self.num_heads, head_dims).transpose(1, 2)
            for t, w, b in zip((query, key, value), weights, biases))
        out = _module_knn_attention(self, query, key, value, self.dropout)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, num_queries, embed_dims))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    extra_repr = _knn_extra_repr


class KNNLITAttention(LITAttention):
    """LIT's global attention with k-NN selection, made by changing an instance's class.

    The top-k keys are chosen after scaling and after LIT's relative-position bias.
    """

    knn_topk: TopkSpec
    knn_chunk_size: Optional[int]

    def forward(self, x: torch.Tensor, hw_shape: Tuple[int, int]) -> torch.Tensor:
        """k-NN attention over all tokens; see :meth:`LITAttention.forward`."""
        batch, num_tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads,
                                  channels // self.num_heads).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        bias = None
        if self.relative_position_bias_table is not None:
            bias = self.relative_position_bias(hw_shape)
        out = _module_knn_attention(
            self, query, key, value, self.attn_drop, scale=self.scale, attn_bias=bias)
        out = out.transpose(1, 2).reshape(batch, num_tokens, channels)
        return self.proj_drop(self.proj(out))

    extra_repr = _knn_extra_repr


# Swin's WindowMSA lives in mmdet and mmseg, which this module imports only on use, so its
# k-NN subclasses are created on demand. They are published as attributes of this module
# (and re-created by the module ``__getattr__`` below) so that pickling a wrapped model works.
_WINDOW_MSA_BASES = {
    'KNNWindowMSA_mmdet': ('mmdet.models.backbones.swin', 'WindowMSA'),
    'KNNWindowMSA_mmseg': ('mmseg.models.backbones.swin', 'WindowMSA'),
}


def _knn_window_msa_class(name: str) -> Type[nn.Module]:
    created = globals().get(name)
    if created is not None:
        return created
    module_name, class_name = _WINDOW_MSA_BASES[name]
    __import__(module_name)
    base = getattr(sys.modules[module_name], class_name)
    cls = type(
        name, (base, ), {
            '__module__': __name__,
            '__qualname__': name,
            '__doc__': f'{module_name}.{class_name} with k-NN attention (KVT).',
            'forward': _window_msa_forward,
            'extra_repr': _knn_extra_repr,
        })
    setattr(sys.modules[__name__], name, cls)
    return cls


def __getattr__(name: str):
    if name in _WINDOW_MSA_BASES:
        return _knn_window_msa_class(name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def _stage_modules_swin(model: nn.Module) -> List[nn.Module]:
    return list(model.stages)


def _stage_modules_pyramid(model: nn.Module) -> List[nn.Module]:
    # PVT / PVTv2 / MiT: layers[i] = ModuleList([patch_embed, blocks, norm]).
    return [layer[1] for layer in model.layers]


def _stage_modules_lit(model: nn.Module) -> List[nn.Module]:
    return list(model.stages)


class _Adapter:
    """How to find the stages and attention modules of one supported backbone class."""

    def __init__(self, stages: Callable[[nn.Module], List[nn.Module]],
                 attention_base: Callable[[], Type[nn.Module]],
                 knn_class: Callable[[], Type[nn.Module]]) -> None:
        self.stages = stages
        self.attention_base = attention_base
        self.knn_class = knn_class


def _swin_adapter(toolbox: str) -> _Adapter:
    name = f'KNNWindowMSA_{toolbox}'
    return _Adapter(_stage_modules_swin, lambda: _knn_window_msa_class(name).__mro__[1],
                    lambda: _knn_window_msa_class(name))


_MHA_ADAPTER = _Adapter(_stage_modules_pyramid, lambda: nn.MultiheadAttention,
                        lambda: KNNMultiheadAttention)

# Fully qualified class name -> adapter. Checked on the class the inner config resolves to,
# so mmdet and mmseg are imported only when their backbones are used.
SUPPORTED_BACKBONES: Dict[str, _Adapter] = {
    'mmdet.models.backbones.swin.SwinTransformer': _swin_adapter('mmdet'),
    'mmdet.models.backbones.pvt.PyramidVisionTransformer': _MHA_ADAPTER,
    'mmdet.models.backbones.pvt.PyramidVisionTransformerV2': _MHA_ADAPTER,
    'mmseg.models.backbones.swin.SwinTransformer': _swin_adapter('mmseg'),
    'mmseg.models.backbones.mit.MixVisionTransformer': _MHA_ADAPTER,
    'mmsparsevit.models.backbones.lit.LIT': _Adapter(_stage_modules_lit, lambda: LITAttention,
                                                     lambda: KNNLITAttention),
}
SUPPORTED_TYPES = ('mmdet.SwinTransformer', 'mmdet.PyramidVisionTransformer',
                   'mmdet.PyramidVisionTransformerV2', 'mmseg.SwinTransformer',
                   'mmseg.MixVisionTransformer', 'mmsparsevit.LIT')


def _resolve_backbone_class(backbone: dict, registry: Registry) -> type:
    """The class a backbone config builds, found the way ``registry.build`` finds it."""
    if not isinstance(backbone, dict) or 'type' not in backbone:
        raise TypeError(f'KVT: backbone must be a config dict with a "type" key, '
                        f'got {backbone!r}')
    backbone_type = backbone['type']
    if isinstance(backbone_type, type):
        return backbone_type
    with registry.switch_scope_and_registry(backbone.get('_scope_')) as scoped:
        cls = scoped.get(backbone_type)
    if cls is None:
        raise KeyError(f'KVT: backbone type {backbone_type!r} is not registered (current '
                       f'scope {scoped.scope!r}); supported: {", ".join(SUPPORTED_TYPES)}')
    return cls


def _qualified_name(cls: type) -> str:
    return f'{cls.__module__}.{cls.__qualname__}'


def convert_to_knn_attention(model: nn.Module,
                             topk: Union[TopkSpec, Sequence[TopkSpec]],
                             chunk_size: Optional[int] = None) -> nn.Module:
    """Switch the attention of a built backbone to k-NN attention, in place.

    Args:
        model (nn.Module): A backbone of a supported class (see ``SUPPORTED_TYPES``).
        topk (int | float | Sequence[int | float]): Keys kept per query: an int (clamped
            to the number of keys), a fraction in (0, 1] of the number of keys, or one such
            value per stage.
        chunk_size (int, optional): Query rows per chunk in :func:`knn_attention`.
            Defaults to None (automatic).

    Returns:
        nn.Module: ``model`` itself, with its attention modules' classes changed.
    """
    name = _qualified_name(type(model))
    adapter = SUPPORTED_BACKBONES.get(name)
    if adapter is None:
        raise TypeError(f'KVT does not support the backbone {name}; supported: '
                        f'{", ".join(SUPPORTED_TYPES)}')
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f'KVT: chunk_size must be a positive int, got {chunk_size}')
    stages = adapter.stages(model)
    per_stage = topk_per_stage(topk, len(stages))
    base, knn_class = adapter.attention_base(), adapter.knn_class()
    num_converted = 0
    for stage_topk, stage in zip(per_stage, stages):
        for module in _exact_instances(stage.modules(), base):
            if isinstance(module, nn.MultiheadAttention):
                reason = KNNMultiheadAttention.unsupported_reason(module)
                if reason is not None:
                    raise TypeError(f'KVT: {name} has an attention with {reason}, which '
                                    'k-NN attention does not support')
            module.__class__ = knn_class
            module.knn_topk = stage_topk
            module.knn_chunk_size = chunk_size
            num_converted += 1
    if num_converted == 0:
        raise TypeError(f'KVT: found no {_qualified_name(base)} module in {name}')
    print_log(f'KVT: {num_converted} attention modules of {type(model).__name__} use k-NN '
              f'attention, topk per stage {list(per_stage)}', logger='current')
    return model


def _exact_instances(modules: Iterable[nn.Module], cls: type) -> List[nn.Module]:
    # Exact type: a subclass may compute attention differently and must not be rewired.
    return [module for module in modules if type(module) is cls]


@MODELS.register_module()
class KVT:
    """KVT: a supported transformer backbone with k-NN attention.

    ``KVT(backbone=..., topk=...)`` (or ``dict(type='mmsparsevit.KVT', ...)`` in a config)
    builds ``backbone`` from its config and returns **that backbone**, with every
    self-attention computing softmax over each query's top-k keys only (selection after
    scaling and after any relative-position bias; keys forbidden by Swin's shifted-window
    mask are never selected). No parameter is added and none is renamed, so the result has
    exactly the inner backbone's parameters and state-dict keys: its checkpoints (and
    detectors/segmentors trained with it) load with ``strict=True``, and its ``init_cfg``
    works as usual.

    Supported inner backbones: mmdet ``SwinTransformer``, ``PyramidVisionTransformer``,
    ``PyramidVisionTransformerV2``; mmseg ``SwinTransformer``, ``MixVisionTransformer``;
    mmsparsevit ``LIT`` (its global-attention stages). The wrapped modules' ``knn_topk``
    attribute holds the setting of their stage.

    Args:
        backbone (dict): Config of the inner backbone, e.g.
            ``dict(type='mmdet.SwinTransformer', ...)``.
        topk (int | float | Sequence[int | float]): Keys each query keeps: an int (clamped
            to the number of keys, e.g. 49 in a 7x7 Swin window), a float fraction in (0, 1]
            of the number of keys (``ceil(topk * num_keys)``), or a list with one such value
            per stage. ``topk >= num_keys`` (or 1.0) reproduces the plain backbone.
        chunk_size (int, optional): Query rows per chunk of the k-NN attention; bounds the
            attention's peak memory to O(chunk_size * num_keys). Defaults to None
            (automatic, about 16 MiB of logits per chunk).

    Returns:
        nn.Module: The inner backbone with k-NN attention.

    Examples:
        >>> from mmsparsevit.registry import MODELS
        >>> model = MODELS.build(dict(
        ...     type='mmsparsevit.KVT', topk=0.5,
        ...     backbone=dict(type='mmdet.SwinTransformer', embed_dims=96)))
        >>> type(model).__name__
        'SwinTransformer'
    """

    def __new__(cls,
                backbone: dict,
                topk: Union[TopkSpec, Sequence[TopkSpec]],
                chunk_size: Optional[int] = None) -> nn.Module:
        backbone_cls = _resolve_backbone_class(backbone, MODELS)
        if _qualified_name(backbone_cls) not in SUPPORTED_BACKBONES:
            raise TypeError(f'KVT does not support the backbone type {backbone["type"]!r} '
                            f'({_qualified_name(backbone_cls)}); supported: '
                            f'{", ".join(SUPPORTED_TYPES)}')
        # Validate topk before an expensive build; the stage count is checked again after it.
        if isinstance(topk, (list, tuple)):
            topk_per_stage(topk, len(topk))
        else:
            topk_per_stage(topk, 1)
        model = MODELS.build(backbone)
        return convert_to_knn_attention(model, topk, chunk_size)
