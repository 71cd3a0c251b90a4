# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Small, odd, non-square inputs, batch size 1 and 1/4-channel images for VVT, LIT and KVT."""
import math

import cv2
import numpy as np
import pytest
import torch
from mmcv.transforms import LoadImageFromFile
from mmengine.config import ConfigDict

import mmsparsevit.models  # noqa: F401
from mmsparsevit.registry import MODELS

SMALL_VVT = dict(type='mmsparsevit.VVT', drop_path_rate=0.0,
                 arch=dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1),
                           num_heads=(1, 2, 4, 8), mlp_ratios=(2, 2, 2, 2)))
SMALL_LIT = dict(type='mmsparsevit.LIT', drop_path_rate=0.0,
                 arch=dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1),
                           num_heads=(1, 2, 4, 8), mlp_ratios=(2, 2, 2, 2),
                           position_encoding='relative'))
SMALL_KVT = dict(type='mmsparsevit.KVT', topk=4,
                 backbone=dict(type='mmdet.SwinTransformer', embed_dims=16, depths=(1, 1, 1, 1),
                               num_heads=(1, 2, 4, 8), window_size=7, drop_path_rate=0.0))
BACKBONES = dict(vvt=SMALL_VVT, lit=SMALL_LIT, kvt=SMALL_KVT)
CHANNELS = (16, 32, 64, 128)  # of all three small archs


def _ceil_halvings(size):
    """Patch embedding of stride 4, then stride-2 merges that pad odd maps (VVT, Swin)."""
    sizes = [math.ceil(size / 4)]
    for _ in range(3):
        sizes.append(math.ceil(sizes[-1] / 2))
    return sizes


def _lit_halvings(size):
    """LIT's DTM: a stride-2 2x2 deformable conv, dropping an odd last row/column."""
    sizes = [math.ceil(size / 4)]
    for _ in range(3):
        sizes.append(max(1, sizes[-1] // 2))
    return sizes


EXPECTED_SIZES = dict(vvt=_ceil_halvings, lit=_lit_halvings, kvt=_ceil_halvings)


def _build(name, in_channels=3):
    cfg = ConfigDict(BACKBONES[name])
    target = cfg.backbone if name == 'kvt' else cfg
    target.in_channels = in_channels
    if name == 'kvt':
        import mmdet.models  # noqa: F401  registers the wrapped Swin
    torch.manual_seed(0)
    model = MODELS.build(cfg)
    model.eval()
    return model


@pytest.mark.parametrize('name', sorted(BACKBONES))
@pytest.mark.parametrize('batch,height,width', [(1, 16, 16), (2, 15, 15), (1, 8, 8),
                                                (1, 33, 65), (2, 37, 21)])
def test_small_odd_and_non_square_inputs(name, batch, height, width):
    model = _build(name)
    with torch.no_grad():
        outputs = model(torch.randn(batch, 3, height, width))
    rows, cols = EXPECTED_SIZES[name](height), EXPECTED_SIZES[name](width)
    assert [tuple(o.shape) for o in outputs] == [
        (batch, channels, h, w) for channels, h, w in zip(CHANNELS, rows, cols)]
    assert all(torch.isfinite(o).all() for o in outputs)


@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_batch_of_one_trains(name):
    model = _build(name)
    model.train()
    image = torch.randn(1, 3, 64, 64, requires_grad=True)
    sum(o.square().mean() for o in model(image)).backward()
    assert torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0


def test_lit_refuses_training_a_batch_of_one_with_a_single_pixel_deepest_map():
    # DTM normalises with BatchNorm, which needs two values per channel in training.
    model = _build('lit')
    model.train()
    with pytest.raises(ValueError, match='Expected more than 1 value per channel when training'):
        model(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize('name', sorted(BACKBONES))
@pytest.mark.parametrize('in_channels', [1, 4])
def test_one_and_four_channel_backbones(name, in_channels):
    model = _build(name, in_channels=in_channels)
    with torch.no_grad():
        outputs = model(torch.randn(1, in_channels, 32, 32))
    assert [tuple(o.shape[2:]) for o in outputs] == [(8, 8), (4, 4), (2, 2), (1, 1)]


@pytest.mark.parametrize('name,message', [
    ('vvt', r'VVT expects images of shape \(B, 3, H, W\) \(in_channels=3\), got \(1, 1, 32, 32\)'),
    ('lit', r'expected input\[1, 1, 32, 32\] to have 3 channels, but got 1 channels'),
    ('kvt', r'expected input\[1, 1, 32, 32\] to have 3 channels, but got 1 channels'),
])
def test_channel_mismatch_is_refused_with_the_counts(name, message):
    with pytest.raises((ValueError, RuntimeError), match=message):
        _build(name)(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize('channels,suffix', [(1, '.jpg'), (4, '.png')])
def test_grey_and_rgba_image_files_load_as_three_channels(tmp_path, channels, suffix):
    # What the configs' LoadImageFromFile (color_type='color') feeds a 3-channel backbone.
    pixels = np.random.RandomState(0).randint(0, 255, (20, 30, channels), np.uint8)
    path = tmp_path / f'image{suffix}'
    cv2.imwrite(str(path), pixels if channels > 1 else pixels[..., 0])
    loaded = LoadImageFromFile()(dict(img_path=str(path)))
    assert loaded['img'].shape == (20, 30, 3) and loaded['ori_shape'] == (20, 30)
