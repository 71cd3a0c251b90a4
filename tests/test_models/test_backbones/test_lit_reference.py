# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Faithfulness of LIT to the authors' models, and helpers other LIT test files import.

The references are ``PlainLIT`` / ``PlainLITTi`` (tools/analysis_tools/transcriptions), written
from the method's equations with the official parameter names and shapes (zhuang-group/LIT:
``LIT`` / ``LIT_Ti`` of the mmdet/mmseg backbones, the ImageNet ``lit_s/m/b`` and ``lit_ti``
classifiers). They share no code with the backbone: deformable sampling comes from
torchvision, the relative-position bias is gathered with separate (dy, dx) indices, LIT-Ti
floors the patch grid as the authors do.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmsparsevit.models.backbones import LIT
from transcriptions import PlainLIT, PlainLITTi

# Published parameter counts of the ImageNet models without the 1000-class head.
PUBLISHED_WITHOUT_HEAD = {'tiny': 19_373_272, 'small': 27_204_720, 'medium': 48_603_264,
                          'base': 86_267_384}


def randomize_(model, offset_std=0.3):
    """Random weights everywhere, non-zero offsets and BN statistics, deterministic."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if 'conv_offset' in name:
                scale = offset_std / math.sqrt(param[0].numel()) if param.dim() > 1 else 0.1
            elif name.endswith('weight') and param.dim() == 1:  # norms: around 1
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen))
                continue
            else:
                scale = 0.02 if 'table' in name or 'pos_embed' in name else (
                    1 / math.sqrt(param[0].numel()) if param.dim() > 1 else 0.05)
            param.copy_(scale * torch.randn(param.shape, generator=gen))
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=gen))
                module.running_var.copy_(1 + torch.rand(module.num_features, generator=gen))
    return model.eval()


def max_rel_error(ours, ref):
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, ref))


def assert_faithful(ours, ref, sizes):
    for size in sizes:
        img = torch.randn(2, 3, *size)
        with torch.no_grad():
            error = max_rel_error(ours(img), ref(img))
        # float32 round-off against an independent transcription summing in another order:
        # measured 1e-6 (8 eps) of the largest output.
        assert error < 1e-5, (size, error)


def load_ours(tmp_path, state_dict, name='ckpt.pth', **kwargs):
    path = tmp_path / name
    torch.save(state_dict, path)
    model = LIT(init_cfg=dict(type='Pretrained', checkpoint=str(path)), **kwargs)
    model.init_weights()
    return model.eval()


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize('arch', ['tiny', 'small', 'medium', 'base'])
def test_official_imagenet_layout_matches_published_counts(arch):
    with torch.device('meta'):
        ref = PlainLITTi(imagenet=True) if arch == 'tiny' else PlainLIT(arch, 224, imagenet=True)
    without_head = count(ref) - ref.head.weight.numel() - ref.head.bias.numel()
    assert without_head == PUBLISHED_WITHOUT_HEAD[arch]


def test_faithful_to_dense_lit_s_coco_backbone(tmp_path):
    torch.manual_seed(0)
    ref = randomize_(PlainLIT('small', table_img=800))
    detector = {f'backbone.{k}': v for k, v in ref.state_dict().items()}
    detector['neck.lateral_convs.0.conv.weight'] = torch.zeros(1)
    ours = load_ours(tmp_path, {'state_dict': detector, 'meta': {}}, arch='small',
                     pretrain_img_size=800)
    assert count(ours) == count(ref)
    assert_faithful(ours, ref, [(64, 96), (70, 90)])


def test_faithful_to_dense_lit_ti_backbone(tmp_path):
    torch.manual_seed(0)
    ref = randomize_(PlainLITTi('tiny'))
    ours = load_ours(tmp_path, {'state_dict': ref.state_dict()}, arch='tiny')
    # The authors' dense LIT-Ti keeps an unused class-token row in pos_embed4.
    assert count(ours) == count(ref) - 512
    assert_faithful(ours, ref, [(64, 64), (96, 128)])


def test_faithful_segmentation_variant_norms_every_stage(tmp_path):
    arch = dict(dims=(32, 64, 96, 128), depths=(1, 1, 2, 1), heads=(1, 2, 3, 4),
                ratios=(4, 4, 4, 4))
    ref = randomize_(PlainLIT(arch, table_img=512, norm_indices=(0, 1, 2, 3)))
    ours = load_ours(
        tmp_path, ref.state_dict(), pretrain_img_size=512, out_norms=(0, 1, 2, 3),
        arch=dict(embed_dims=(32, 64, 96, 128), depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4),
                  mlp_ratios=(4, 4, 4, 4)))
    assert_faithful(ours, ref, [(67, 131)])


def test_imagenet_weights_give_the_dense_reference_outputs(tmp_path):
    """ImageNet release -> ours equals the authors' dense backbone initialised from it (their
    loader bicubically resizes the tables to 800-sized ones; output norms start at 1/0)."""
    arch = dict(dims=(32, 64, 96, 128), depths=(1, 1, 2, 1), heads=(1, 2, 3, 4),
                ratios=(4, 4, 4, 4))
    imagenet = randomize_(PlainLIT(arch, table_img=224, imagenet=True))
    dense = PlainLIT(arch, table_img=800).eval()
    state = {k: v for k, v in imagenet.state_dict().items()
             if not k.startswith(('head', 'norm.')) and 'relative_position_index' not in k}
    for key, value in list(state.items()):
        if key.endswith('relative_position_bias_table'):
            side, target = math.isqrt(value.shape[0]), dense.state_dict()[key].shape[0]
            grid = value.t().reshape(1, -1, side, side)
            grid = F.interpolate(grid, size=(math.isqrt(target), ) * 2, mode='bicubic')
            state[key] = grid.reshape(value.shape[1], -1).t()
    missing = dense.load_state_dict(state, strict=False).missing_keys
    assert sorted(missing) == sorted(f'norm{i}.{p}' for i in (1, 2, 3)
                                     for p in ('weight', 'bias'))
    ours = load_ours(tmp_path, {'model': imagenet.state_dict()}, pretrain_img_size=800,
                     out_norms=(1, 2, 3),
                     arch=dict(embed_dims=(32, 64, 96, 128), depths=(1, 1, 2, 1),
                               num_heads=(1, 2, 3, 4), mlp_ratios=(4, 4, 4, 4)))
    assert_faithful(ours, dense, [(64, 64)])
