# Copyright (c) mmsparsevit contributors. All rights reserved.
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_lit_reference import load_ours, randomize_

from mmsparsevit.models.backbones import LIT
from mmsparsevit.models.backbones.lit import convert_lit_checkpoint
from transcriptions import PlainLIT, PlainLITTi

REPO = Path(__file__).resolve().parents[3]
MINI_REF = dict(dims=(16, 32, 48, 64), depths=(1, 2, 2, 1), heads=(1, 2, 3, 4),
                ratios=(2, 2, 2, 2))
MINI = dict(embed_dims=(16, 32, 48, 64), depths=(1, 2, 2, 1), num_heads=(1, 2, 3, 4),
            mlp_ratios=(2, 2, 2, 2))


def _zeros_like_layout(ref):
    return {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in ref.state_dict().items()}


@pytest.mark.parametrize('arch', ['tiny', 'small', 'medium', 'base'])
def test_every_imagenet_tensor_finds_its_place(arch):
    with torch.device('meta'):
        ref = PlainLITTi(imagenet=True) if arch == 'tiny' else PlainLIT(arch, 224, imagenet=True)
        model = LIT(arch=arch)
    official = _zeros_like_layout(ref)
    converted, dropped = convert_lit_checkpoint({'model': official})
    own = model.state_dict()
    assert sorted(set(converted) - set(own)) == []
    assert all(converted[k].shape == own[k].shape for k in converted)
    newly_initialised = sorted(set(own) - set(converted))
    assert newly_initialised == sorted(f'norm{i}.{p}' for i in LIT.arch_zoo[arch]['out_norms']
                                       for p in ('weight', 'bias'))
    expected_drops = {'head.weight', 'head.bias', 'norm.weight', 'norm.bias'}
    if arch == 'tiny':
        expected_drops |= {'cls_token', 'pos_embed4[:, 0]'}
    else:
        expected_drops |= {k for k in official if k.endswith('relative_position_index')}
    assert set(dropped) == expected_drops
    carried = sum(v.numel() for k, v in official.items()
                  if k not in dropped and 'running' not in k and 'num_batches' not in k)
    if arch == 'tiny':
        carried -= 512  # the class-token row of pos_embed4
    assert carried == sum(v.numel() for k, v in converted.items()
                          if 'running' not in k and 'num_batches' not in k)


def test_imagenet_file_loads_through_init_cfg_and_reports(tmp_path, caplog):
    ref = randomize_(PlainLITTi(MINI_REF, img=64, imagenet=True))
    model = load_ours(tmp_path, {'model': ref.state_dict(), 'epoch': 3}, arch=dict(
        MINI, position_encoding='absolute', norm_eps=1e-6, out_norms=(3, )), pretrain_img_size=64)
    # Copied and reshaped, not computed: bitwise.
    assert torch.equal(model.stages[3].pos_embed.flatten(2).transpose(1, 2),
                       ref.pos_embed4[:, 1:])
    assert torch.equal(model.stages[1].downsample.conv_offset.weight,
                       ref.patch_embed2.dconv.conv_offset.weight)
    assert torch.equal(model.stages[2].blocks[1].ffn.layers[1].weight,
                       ref.block3[1].mlp.fc2.weight)


def test_position_params_are_resized_to_the_model(tmp_path):
    ref = randomize_(PlainLITTi(MINI_REF, img=64, imagenet=True))
    model = load_ours(tmp_path, {'model': ref.state_dict()}, pretrain_img_size=128,
                      arch=dict(MINI, position_encoding='absolute', norm_eps=1e-6))
    assert model.stages[0].pos_embed.shape == (1, 16, 32, 32)
    swin = randomize_(PlainLIT(MINI_REF, table_img=224, imagenet=True))
    model = load_ours(tmp_path, {'model': swin.state_dict()}, pretrain_img_size=800, arch=MINI)
    table = model.stages[3].blocks[0].attn.relative_position_bias_table
    assert table.shape == (49 * 49, 4)
    source = swin.layers[3].blocks[0].attn.relative_position_bias_table
    # Bicubic resizing keeps the centre (zero displacement) entry of a 13 -> 49 grid, bitwise:
    # it samples the source exactly at a grid point, where the cubic weights are 1 and 0.
    assert torch.equal(table[24 * 49 + 24], source[6 * 13 + 6])


def test_mismatched_checkpoints_name_the_keys(tmp_path):
    ref = PlainLIT(MINI_REF, table_img=224)
    state = ref.state_dict()
    with pytest.raises(ValueError, match=r'2 unexpected \(norm0\.weight, norm0\.bias\)'):
        load_ours(tmp_path, dict(state, **{'norm0.weight': torch.ones(16),
                                           'norm0.bias': torch.zeros(16)}),
                  arch=MINI, out_norms=(1, 2, 3))
    with pytest.raises(ValueError, match=r'stages\.0\.blocks\.0\.ffn\.layers\.0\.0\.weight'):
        load_ours(tmp_path, state, arch=dict(MINI, mlp_ratios=(4, 2, 2, 2)))
    del state['layers.2.blocks.1.mlp.fc2.bias']
    with pytest.raises(ValueError, match=r'1 missing \(stages\.2\.blocks\.1\.ffn'):
        load_ours(tmp_path, state, arch=MINI)
    with pytest.raises(ValueError, match=r'unrecognised LIT checkpoint keys: \[.extra'):
        convert_lit_checkpoint(dict(ref.state_dict(), extra=torch.zeros(1)))
    with pytest.raises(ValueError, match='not a LIT checkpoint'):
        convert_lit_checkpoint({'conv1.weight': torch.zeros(1)})


def test_converter_cli_round_trip(tmp_path):
    ref = randomize_(PlainLIT(MINI_REF, table_img=224, imagenet=True))
    src, dst = tmp_path / 'lit_mini.pth', tmp_path / 'converted.pth'
    torch.save({'model': ref.state_dict()}, src)
    subprocess.run([sys.executable, str(REPO / 'tools/model_converters/lit2mmsparsevit.py'),
                    str(src), str(dst)], check=True, cwd=tmp_path, capture_output=True)
    direct = load_ours(tmp_path, {'model': ref.state_dict()}, 'direct.pth', arch=MINI)
    via_file = LIT(arch=MINI, init_cfg=dict(type='Pretrained', checkpoint=str(dst)))
    via_file.init_weights()
    img = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(direct(img), via_file.eval()(img)):
            assert torch.equal(a, b)
