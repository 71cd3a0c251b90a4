# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Registry-based backbone swapping: one detector and one segmentor config switch to every
backbone of this package through ``--cfg-options`` alone (parsed exactly as tools/train.py
parses them), then build and run a forward pass on a tiny input."""
import argparse
from typing import List

import pytest
import torch
from mmengine.config import Config, DictAction

from config_test_utils import CONFIG_ROOT, build_model, missing_backbone_modules

DETECTOR = CONFIG_ROOT / 'retinanet' / 'retinanet_pvtv2-b2_fpn_1x_coco.py'
SEGMENTOR = CONFIG_ROOT / 'fpn' / 'fpn_pvtv2-b2_4xb4-80k_ade20k-512x512.py'
IMAGE_SIZE = 64

# What a user types after --cfg-options to put each backbone of this package into a config.
# `model.backbone._delete_=True` drops the previous backbone's keyword arguments. Each entry:
# class of the built backbone (KVT returns the backbone it wraps, with k-NN attention
# modules), its stage channels, the options.
SWAPS = {
    'vvt': ('VVT', (96, 160, 320, 512), [
        'model.backbone._delete_=True', 'model.backbone.type=mmsparsevit.VVT',
        'model.backbone.arch=tiny', 'model.neck.in_channels=[96,160,320,512]'
    ]),
    'lit': ('LIT', (64, 128, 320, 512), [
        'model.backbone._delete_=True', 'model.backbone.type=mmsparsevit.LIT',
        'model.backbone.arch=tiny', 'model.neck.in_channels=[64,128,320,512]'
    ]),
    'kvt-pvtv2': ('PyramidVisionTransformerV2', (64, 128, 320, 512), [
        'model.backbone._delete_=True', 'model.backbone.type=mmsparsevit.KVT',
        'model.backbone.topk=0.5',
        'model.backbone.backbone.type=mmdet.PyramidVisionTransformerV2',
        'model.backbone.backbone.embed_dims=64', 'model.backbone.backbone.num_layers=[3,4,6,3]'
    ]),
    'kvt-swin': ('SwinTransformer', (96, 192, 384, 768), [
        'model.backbone._delete_=True', 'model.backbone.type=mmsparsevit.KVT',
        'model.backbone.topk=0.5', 'model.backbone.backbone.type=mmdet.SwinTransformer',
        'model.neck.in_channels=[96,192,384,768]'
    ]),
    'kvt-lit': ('LIT', (64, 128, 320, 512), [
        'model.backbone._delete_=True', 'model.backbone.type=mmsparsevit.KVT',
        'model.backbone.topk=0.5', 'model.backbone.backbone.type=mmsparsevit.LIT',
        'model.backbone.backbone.arch=tiny', 'model.neck.in_channels=[64,128,320,512]'
    ]),
}


def cfg_with_options(path, options: List[str]) -> Config:
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args(['--cfg-options', *options])
    cfg = Config.fromfile(str(path))
    cfg.merge_from_dict(args.cfg_options)
    missing = missing_backbone_modules(cfg.model)
    if missing:
        pytest.skip(f'swap needs {", ".join(missing)}, which is not in the repository yet')
    return cfg


def swapped_forward(path, swap):
    """Build the swapped config's model and run the backbone and the whole model (tensor
    mode) on one tiny image; checks the backbone class and its stage maps."""
    class_name, channels, options = SWAPS[swap]
    model = build_model(cfg_with_options(path, options)).eval()
    assert type(model.backbone).__name__ == class_name
    knn_modules = [m for m in model.backbone.modules() if hasattr(m, 'knn_topk')]
    if swap.startswith('kvt-'):
        assert knn_modules and all(m.knn_topk == 0.5 for m in knn_modules)
    else:
        assert not knn_modules
    inputs = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        features = model.backbone(inputs)
        outputs = model(inputs, mode='tensor')
    assert [f.shape[1] for f in features] == list(channels)
    return features, outputs


@pytest.mark.parametrize('swap', list(SWAPS))
def test_detector_switches_backbone_by_cfg_options(swap):
    features, (cls_scores, bbox_preds) = swapped_forward(DETECTOR, swap)
    assert [tuple(f.shape[-2:]) for f in features] == [
        (IMAGE_SIZE // s, IMAGE_SIZE // s) for s in (4, 8, 16, 32)]
    # RetinaNet: 5 levels (strides 8-128), 9 anchors x 80 classes / 9 x 4 box deltas.
    assert [tuple(c.shape) for c in cls_scores] == [
        (1, 9 * 80, *size) for size in ((8, 8), (4, 4), (2, 2), (1, 1), (1, 1))]
    assert [b.shape[1] for b in bbox_preds] == [9 * 4] * 5
    assert all(torch.isfinite(c).all() for c in cls_scores)


@pytest.mark.parametrize('swap', list(SWAPS))
def test_segmentor_switches_backbone_by_cfg_options(swap):
    _, logits = swapped_forward(SEGMENTOR, swap)
    # Semantic FPN predicts 150 ADE20K classes at stride 4.
    assert tuple(logits.shape) == (1, 150, IMAGE_SIZE // 4, IMAGE_SIZE // 4)
    assert torch.isfinite(logits).all()
