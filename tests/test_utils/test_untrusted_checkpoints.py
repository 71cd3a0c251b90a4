# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Every way the toolkit loads a checkpoint refuses a code-executing pickle without running it,
from a local file and from a URL (a server on 127.0.0.1 started by the test).

(mmengine's own loaders and a plain ``BaseModule`` Pretrained init are covered in
tests/test_utils/test_checkpoint_safety.py; these are the toolkit's tools and backbones.)
"""
import re
import shutil
import sys

import pytest
import torch
from mmengine.config import ConfigDict
from robustness_utils import DET_CONFIG, WritesFile, data_options, load_tool, make_fixture_data

from mmsparsevit.registry import MODELS
from mmsparsevit.utils import UnsafeCheckpointError

SMALL_VVT = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
                 mlp_ratios=(2, 2, 2, 2))
SMALL_SWIN = dict(type='mmdet.SwinTransformer', embed_dims=32, depths=(1, 1, 1, 1),
                  num_heads=(1, 2, 4, 8), window_size=7)


@pytest.fixture
def hostile(tmp_path):
    """A checkpoint whose unpickling would create ``payload_ran``; and that sentinel."""
    sentinel = tmp_path / 'payload_ran'
    path = tmp_path / 'hostile.pth'
    torch.save({'state_dict': {'w': torch.ones(1)}, 'meta': WritesFile(sentinel),
                'model': WritesFile(sentinel)}, path)
    return path, sentinel


@pytest.fixture(params=['path', 'url'])
def hostile_source(request, hostile, checkpoint_server):
    """The hostile checkpoint as a local path, or as a URL of a server on 127.0.0.1."""
    path, sentinel = hostile
    if request.param == 'path':
        return str(path), sentinel
    shutil.copy(path, checkpoint_server.root / 'hostile.pth')
    return checkpoint_server.url('hostile.pth'), sentinel


def _refusal(path):
    return (f'refusing to load checkpoint {path}: it asks for a call of builtins.exec, which is '
            'outside the allow-list of tensors, containers and the classes mmengine stores; '
            'nothing of it was executed')


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return make_fixture_data(tmp_path_factory.mktemp('data'), num_train=2, num_val=1)


@pytest.mark.parametrize('converter', ['vvt2mmsparsevit.py', 'lit2mmsparsevit.py'])
def test_converter_refuses_payload(hostile_source, tmp_path, monkeypatch, converter):
    path, sentinel = hostile_source
    cli = load_tool(f'model_converters/{converter}')
    monkeypatch.setattr(sys, 'argv', [converter, path, str(tmp_path / 'out.pth')])
    with pytest.raises(UnsafeCheckpointError) as raised:
        cli.main()
    assert str(raised.value) == (
        f'{_refusal(path)}. If you trust its origin, convert it to a plain state dict first.')
    assert not sentinel.exists() and not (tmp_path / 'out.pth').exists()


@pytest.mark.parametrize('backbone', [
    dict(type='mmsparsevit.VVT', arch=SMALL_VVT),
    dict(type='mmsparsevit.LIT', arch='tiny'),
    dict(type='mmsparsevit.KVT', topk=4, backbone=SMALL_SWIN),
])
def test_backbone_pretrained_init_refuses_payload(hostile_source, backbone):
    import mmdet.models  # noqa: F401  registers the wrapped mmdet backbone
    path, sentinel = hostile_source
    inner = backbone.get('backbone', backbone)
    inner['init_cfg'] = dict(type='Pretrained', checkpoint=path)
    model = MODELS.build(ConfigDict(backbone))  # as from a config: mmdet reads attributes
    with pytest.raises(UnsafeCheckpointError, match=re.escape(_refusal(path))):
        model.init_weights()
    assert not sentinel.exists()


def test_test_tool_refuses_payload(hostile_source, data_root, tmp_path):
    path, sentinel = hostile_source
    test_tool = load_tool('test.py')
    with pytest.raises(UnsafeCheckpointError, match=re.escape(_refusal(path))):
        test_tool.main([str(DET_CONFIG), path, '--work-dir', str(tmp_path / 'work'),
                        '--cfg-options', *data_options(DET_CONFIG, data_root)])
    assert not sentinel.exists()


def test_inference_tool_refuses_payload(hostile_source, data_root, tmp_path):
    path, sentinel = hostile_source
    image = sorted((data_root / 'coco' / 'val').glob('*.jpg'))[0]
    with pytest.raises(UnsafeCheckpointError, match=re.escape(_refusal(path))):
        load_tool('inference.py').main([str(DET_CONFIG), path, str(image), '--out',
                                        str(tmp_path / 'drawn.png')])
    assert not sentinel.exists() and not (tmp_path / 'drawn.png').exists()


@pytest.mark.parametrize('how', ['--resume PATH', 'load_from'])
def test_train_tool_refuses_payload(hostile_source, data_root, how, tmp_path):
    path, sentinel = hostile_source
    train_tool = load_tool('train.py')
    options = [*data_options(DET_CONFIG, data_root), 'train_cfg.max_iters=1']
    if how == 'load_from':
        args = ['--cfg-options', *options, f'load_from={path}']
    else:
        args = ['--resume', path, '--cfg-options', *options]
    with pytest.raises(UnsafeCheckpointError, match=re.escape(_refusal(path))):
        train_tool.main([str(DET_CONFIG), '--work-dir', str(tmp_path / 'work'), *args])
    assert not sentinel.exists()
