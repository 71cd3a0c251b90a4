"""Named backbone configs compared by the cost tools (``--backbone NAME``).

Baselines are the OpenMMLab implementations of the models the papers compare with, at the
sizes of their tables; ``kvt-*`` wrap them with k-NN attention (no extra parameters).
"""
from typing import Dict

SWIN_T = dict(
    type='mmdet.SwinTransformer',
    embed_dims=96,
    depths=(2, 2, 6, 2),
    num_heads=(3, 6, 12, 24),
    window_size=7)
PVTV2_B2 = dict(
    type='mmdet.PyramidVisionTransformerV2', embed_dims=64, num_layers=(3, 4, 6, 3))

BACKBONE_PRESETS: Dict[str, dict] = {
    'vvt-t': dict(type='mmsparsevit.VVT', arch='tiny'),
    'vvt-s': dict(type='mmsparsevit.VVT', arch='small'),
    'vvt-m': dict(type='mmsparsevit.VVT', arch='medium'),
    'vvt-l': dict(type='mmsparsevit.VVT', arch='large'),
    'lit-ti': dict(type='mmsparsevit.LIT', arch='tiny'),
    'lit-s': dict(type='mmsparsevit.LIT', arch='small'),
    'lit-m': dict(type='mmsparsevit.LIT', arch='medium'),
    'lit-b': dict(type='mmsparsevit.LIT', arch='base'),
    'kvt-swin-t': dict(type='mmsparsevit.KVT', topk=0.5, backbone=SWIN_T),
    'kvt-pvtv2-b2': dict(type='mmsparsevit.KVT', topk=0.5, backbone=PVTV2_B2),
    'swin-t': SWIN_T,
    'pvt-s': dict(
        type='mmdet.PyramidVisionTransformer', embed_dims=64, num_layers=(3, 4, 6, 3)),
    'pvtv2-b2': PVTV2_B2,
    'resnet-50': dict(type='mmdet.ResNet', depth=50),
}

# The resolution-scaling comparison of complexity_curve.py.
CURVE_PRESETS = ('vvt-s', 'lit-s', 'kvt-swin-t', 'kvt-pvtv2-b2', 'swin-t', 'pvt-s', 'pvtv2-b2',
                 'resnet-50')
