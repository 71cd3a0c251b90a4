# Copyright (c) mmsparsevit contributors. All rights reserved.
"""KVT: an existing transformer backbone whose self-attention is k-NN attention.

Paper: "KVT: k-NN Attention for Boosting Vision Transformers" (ECCV 2022,
https://arxiv.org/abs/2106.00515); the authors' code (damo-cv/KVT) covers DeiT only, as timm's
``VisionTransformer``, which :func:`convert_to_knn_attention` converts too.

``type='mmsparsevit.KVT'`` (:func:`build_kvt`) builds the inner backbone from its own config
and :func:`convert_to_knn_attention` replaces each of its attention modules by a k-NN module
(:mod:`mmsparsevit.models.layers.knn_attention_modules`) that takes over the replaced
module's parameters, buffers and submodules. The result *is* the inner backbone (same type,
same parameter objects, same state-dict keys): ImageNet checkpoints, detectors trained with
the plain backbone and the inner backbone's ``init_cfg`` all load unchanged.
"""
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Type, Union

import torch.nn as nn
from mmengine.logging import print_log
from mmengine.registry import Registry

from mmsparsevit.registry import MODELS
from ..layers.knn_attention import TopkSpec, topk_per_stage
from ..layers.knn_attention_modules import (KNNLITAttention, KNNLocallyGroupedSelfAttention,
                                            KNNMultiheadAttention, KNNTimmAttention,
                                            KNNWindowMSA)
from ..layers.lit_attention import LITAttention


def _qualified_name(cls: type) -> str:
    return f'{cls.__module__}.{cls.__qualname__}'


def _stages(model: nn.Module) -> List[nn.Module]:
    return list(model.stages)


def _pyramid_stages(model: nn.Module) -> List[nn.Module]:
    # PVT / PVTv2 / MiT: layers[i] = ModuleList([patch_embed, blocks, norm]).
    return [layer[1] for layer in model.layers]


def _layers(model: nn.Module) -> List[nn.Module]:
    # Twins (PCPVT, SVT): layers[i] = ModuleList of the blocks of stage i.
    return list(model.layers)


def _blocks(model: nn.Module) -> List[nn.Module]:
    # timm's ViT / DeiT: one isotropic stage.
    return [model.blocks]


_TIMM_VITS = ('timm.models.vision_transformer.VisionTransformer',
              'timm.models.deit.VisionTransformerDistilled')


def _timm_backbone_blocks(model: nn.Module) -> List[nn.Module]:
    """The blocks of the ViT / DeiT inside mmseg's ``TIMMBackbone``; any other is refused.

    ``TIMMBackbone`` holds the timm model itself or, with ``features_only`` (its default),
    timm's ``FeatureGetterNet`` around it as ``.model``.
    """
    timm_model = getattr(model.timm_model, 'model', model.timm_model)
    name = _qualified_name(type(timm_model))
    if name not in _TIMM_VITS:
        raise TypeError(f'KVT converts mmseg.TIMMBackbone only around timm\'s '
                        f'{" or ".join(_TIMM_VITS)}, got {name}')
    return _blocks(timm_model)


class _Conversion(NamedTuple):
    """How to convert one supported backbone class."""

    # The backbone's stages, in order: a per-stage topk list is matched against them.
    stages: Callable[[nn.Module], List[nn.Module]]
    # Qualified name of each attention class replaced -> the k-NN class built as
    # knn_class(module, topk, chunk_size) in its place. Names, not classes, so that mmdet,
    # mmseg and timm are not imported here; exact names, so that a subclass, which may compute
    # attention differently, is left alone.
    replacements: Dict[str, Type[nn.Module]]


_TO_KNN_MHA = {_qualified_name(nn.MultiheadAttention): KNNMultiheadAttention}
_MHA = _Conversion(_pyramid_stages, _TO_KNN_MHA)
_TO_KNN_TIMM = {'timm.layers.attention.Attention': KNNTimmAttention}

# Qualified backbone class name -> its conversion. Checked on the class the inner config
# resolves to, before it is built.
SUPPORTED_BACKBONES: Dict[str, _Conversion] = {
    'mmdet.models.backbones.swin.SwinTransformer': _Conversion(
        _stages, {'mmdet.models.backbones.swin.WindowMSA': KNNWindowMSA}),
    'mmdet.models.backbones.pvt.PyramidVisionTransformer': _MHA,
    'mmdet.models.backbones.pvt.PyramidVisionTransformerV2': _MHA,
    'mmseg.models.backbones.swin.SwinTransformer': _Conversion(
        _stages, {'mmseg.models.backbones.swin.WindowMSA': KNNWindowMSA}),
    'mmseg.models.backbones.mit.MixVisionTransformer': _MHA,
    # The registry route to timm's ViT / DeiT (features for dense prediction).
    'mmseg.models.backbones.timm_backbone.TIMMBackbone': _Conversion(
        _timm_backbone_blocks, _TO_KNN_TIMM),
    # Twins: global sub-sampled attention is MiT's, with its nn.MultiheadAttention inside.
    'mmseg.models.backbones.twins.PCPVT': _Conversion(_layers, _TO_KNN_MHA),
    'mmseg.models.backbones.twins.SVT': _Conversion(_layers, {
        **_TO_KNN_MHA,
        'mmseg.models.backbones.twins.LocallyGroupedSelfAttention':
        KNNLocallyGroupedSelfAttention,
    }),
    'mmsparsevit.models.backbones.lit.LIT': _Conversion(
        _stages, {_qualified_name(LITAttention): KNNLITAttention}),
    # Python API (timm models are not in a registry); DeiT models are these classes.
    **{name: _Conversion(_blocks, _TO_KNN_TIMM) for name in _TIMM_VITS},
}


def _supported_types() -> str:
    """The supported backbones as config types: 'mmdet.SwinTransformer, ...'."""
    return ', '.join(f'{name.split(".")[0]}.{name.rsplit(".", 1)[1]}'
                     for name in SUPPORTED_BACKBONES)


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
                       f'scope {scoped.scope!r}); supported: {_supported_types()}')
    return cls


def _replace_attention(module: nn.Module, conversion: _Conversion, topk: TopkSpec,
                       chunk_size: Optional[int]) -> int:
    """Replace every module of a ``conversion.replacements`` class below ``module``.

    Returns:
        int: How many modules were replaced.
    """
    num_replaced = 0
    for name, child in list(module.named_children()):
        knn_class = conversion.replacements.get(_qualified_name(type(child)))
        if knn_class is not None:
            module.add_module(name, knn_class(child, topk, chunk_size))
            num_replaced += 1
        else:
            num_replaced += _replace_attention(child, conversion, topk, chunk_size)
    return num_replaced


def convert_to_knn_attention(model: nn.Module,
                             topk: Union[TopkSpec, Sequence[TopkSpec]],
                             chunk_size: Optional[int] = None) -> nn.Module:
    """Replace the attention modules of a built backbone by k-NN attention, in place.

    In the manner of ``nn.SyncBatchNorm.convert_sync_batchnorm``: each attention module of
    the backbone is replaced by a k-NN module built from it, which holds the very same
    parameter and buffer objects under the same names. Parameters, state-dict keys and
    their order are unchanged, so optimizers and checkpoints of the plain model apply.

    Args:
        model (nn.Module): A model of a supported class (``SUPPORTED_BACKBONES``): an
            mmdet/mmseg/mmsparsevit backbone, or a timm ``VisionTransformer`` (DeiT) or
            ``VisionTransformerDistilled`` classifier, whose blocks are its one stage.
        topk (int | float | Sequence[int | float]): Keys kept per query: an int (clamped
            to the number of keys), a fraction in (0, 1] of the number of keys, or one such
            value per stage.
        chunk_size (int, optional): Query rows per chunk in :func:`knn_attention`.
            Defaults to None (automatic).

    Returns:
        nn.Module: ``model`` itself, with its attention modules replaced.

    Examples:
        >>> import timm
        >>> deit = timm.create_model('deit_small_patch16_224', pretrained=False)
        >>> deit = convert_to_knn_attention(deit, topk=100)  # the authors' k
        >>> type(deit.blocks[0].attn).__name__
        'KNNTimmAttention'
    """
    name = _qualified_name(type(model))
    conversion = SUPPORTED_BACKBONES.get(name)
    if conversion is None:
        raise TypeError(f'KVT does not support the backbone {name}; supported: '
                        f'{_supported_types()}')
    stages = conversion.stages(model)
    per_stage = topk_per_stage(topk, len(stages))
    num_converted = sum(
        _replace_attention(stage, conversion, stage_topk, chunk_size)
        for stage_topk, stage in zip(per_stage, stages))
    if num_converted == 0:
        raise TypeError(f'KVT: found no {" or ".join(conversion.replacements)} module in '
                        f'{name}')
    print_log(f'KVT: {num_converted} attention modules of {type(model).__name__} use k-NN '
              f'attention, topk per stage {list(per_stage)}', logger='current')
    return model


@MODELS.register_module(name='KVT')
def build_kvt(backbone: dict,
              topk: Union[TopkSpec, Sequence[TopkSpec]],
              chunk_size: Optional[int] = None) -> nn.Module:
    """KVT: a supported transformer backbone with k-NN attention (``type='mmsparsevit.KVT'``).

    Builds ``backbone`` from its config and returns **that backbone**, with every
    self-attention computing softmax over each query's top-k keys only (selection after
    scaling and after any relative-position bias; keys forbidden by Swin's shifted-window
    mask and Twins' window padding are never selected), see :func:`convert_to_knn_attention`.
    No parameter is added
    and none is renamed, so the result has exactly the inner backbone's parameters and
    state-dict keys: its checkpoints (and detectors/segmentors trained with it) load with
    ``strict=True``, and its ``init_cfg`` works as usual.

    Supported inner backbones: mmdet ``SwinTransformer``, ``PyramidVisionTransformer``,
    ``PyramidVisionTransformerV2``; mmseg ``SwinTransformer``, ``MixVisionTransformer``,
    ``PCPVT``, ``SVT`` and ``TIMMBackbone`` around a timm ``VisionTransformer`` (DeiT);
    mmsparsevit ``LIT`` (its global-attention stages). The k-NN modules' ``knn_topk``
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
    backbone_cls = _resolve_backbone_class(backbone, MODELS)
    if _qualified_name(backbone_cls) not in SUPPORTED_BACKBONES:
        raise TypeError(f'KVT does not support the backbone type {backbone["type"]!r} '
                        f'({_qualified_name(backbone_cls)}); supported: {_supported_types()}')
    # Validate topk before an expensive build; the stage count is checked again after it.
    topk_per_stage(topk, len(topk) if isinstance(topk, (list, tuple)) else 1)
    model = MODELS.build(backbone)
    # mmdet's and mmseg's Swin apply frozen_stages only in train(), which mmengine's runner
    # calls after DDP has registered the parameters that require gradients: DDP without the
    # unused-parameter search would then wait for gradients of the frozen ones. A new module
    # is in training mode already, so train() changes nothing but the freezing.
    model.train()
    return convert_to_knn_attention(model, topk, chunk_size)
