# Copyright (c) mmsparsevit contributors. All rights reserved.
"""The authors' training checkpoints load as their scripts save them.

- VVT's and LIT-Ti's ``main.py`` (DeiT-style): ``model``, ``optimizer``, ``lr_scheduler``,
  ``epoch``, ``scaler`` and ``args`` (an ``argparse.Namespace``); LIT-Ti adds ``global_step``.
- LIT-S/M/B's ``utils.py`` (Swin-style): ``model``, ``optimizer``, ``lr_scheduler``,
  ``max_accuracy``, ``epoch``, apex's ``amp`` state and ``config``, a yacs ``CfgNode`` (yacs is
  not installed here: its class does not exist when the file is loaded).

Each goes through ``init_cfg`` Pretrained, ``load_from`` and the converter.
"""
import argparse
import importlib
import sys
import types

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner import Runner
from test_lit_reference import randomize_
from tool_test_utils import DET_CONFIG, load_tool

from mmsparsevit.models import LIT, VVT
from mmsparsevit.runtime import harden_train_config
from transcriptions import PlainLIT, PlainLITTi, PlainVVT

VVT_ARCH = VVT.arch_zoo['tiny']  # a preset: the converter checks against the one it matches
LIT_REF = dict(dims=(16, 32, 48, 64), depths=(1, 2, 2, 1), heads=(1, 2, 3, 4),
               ratios=(2, 2, 2, 2))
LIT_ARCH = dict(embed_dims=(16, 32, 48, 64), depths=(1, 2, 2, 1), num_heads=(1, 2, 3, 4),
                mlp_ratios=(2, 2, 2, 2))
LIT_TI_ARCH = dict(LIT_ARCH, position_encoding='absolute', norm_eps=1e-6, out_norms=())


def _training_state(model):
    """What a training script holds after some steps: AdamW with moments, a timm-style
    scheduler, a GradScaler's state."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = sum(p.float().pow(2).sum() for p in model.parameters())
    loss.backward()
    optimizer.step()
    scheduler = dict(t_initial=300, lr_min=1e-5, warmup_t=5, base_values=[1e-3],
                     param_group_field='lr', noise_range_t=None, t_in_epochs=True)
    scaler = dict(scale=65536.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                  _growth_tracker=17)
    return optimizer.state_dict(), scheduler, scaler


def deit_style_file(model, lit_ti=False):
    """As VVT's and LIT-Ti's main.py save them."""
    optimizer, scheduler, scaler = _training_state(model)
    args = argparse.Namespace(model='lit_ti' if lit_ti else 'vvt_small', batch_size=128,
                              epochs=300, lr=5e-4, drop_path=0.1, output_dir='out',
                              betas=None, dist_url='env://', resume='')
    checkpoint = dict(model=model.state_dict(), optimizer=optimizer, lr_scheduler=scheduler,
                      epoch=299, scaler=scaler, args=args)
    if lit_ti:
        checkpoint['global_step'] = 375_000
    return checkpoint


@pytest.fixture
def yacs_config(monkeypatch):
    """A yacs-like ``CfgNode`` class that exists while a file is saved; ``remove()`` makes it
    vanish, as it is on a machine without yacs."""
    package, module = types.ModuleType('yacs'), types.ModuleType('yacs.config')

    class CfgNode(dict):

        def __init__(self, entries=None):
            super().__init__(entries or {})
            self.__dict__['__immutable__'] = True

    CfgNode.__module__, CfgNode.__qualname__ = 'yacs.config', 'CfgNode'
    module.CfgNode, package.config = CfgNode, module
    monkeypatch.setitem(sys.modules, 'yacs', package)
    monkeypatch.setitem(sys.modules, 'yacs.config', module)
    module.remove = lambda: (monkeypatch.delitem(sys.modules, 'yacs'),
                             monkeypatch.delitem(sys.modules, 'yacs.config'))
    return module


def swin_style_file(model, yacs_config):
    """As LIT-S/M/B's utils.py saves them (with apex AMP on)."""
    optimizer, scheduler, _ = _training_state(model)
    node = yacs_config.CfgNode
    config = node(dict(MODEL=node(dict(TYPE='lit', NAME='lit_small', DROP_PATH_RATE=0.2,
                                       LIT=node(dict(DEPTHS=[2, 2, 6, 2], EMBED_DIM=96)))),
                       TRAIN=node(dict(EPOCHS=300, BASE_LR=1e-3)), AMP_OPT_LEVEL='O1'))
    return dict(model=model.state_dict(), optimizer=optimizer, lr_scheduler=scheduler,
                max_accuracy=81.5, epoch=299, config=config,
                amp={'loss_scaler0': {'loss_scale': 65536.0, 'unskipped': 0}})


def _cases(yacs_config):
    torch.manual_seed(0)
    vvt = PlainVVT(**VVT_ARCH, num_classes=10)
    lit_ti = randomize_(PlainLITTi(LIT_REF, img=64, imagenet=True))
    lit_s = randomize_(PlainLIT(LIT_REF, table_img=64, imagenet=True))
    return {
        'vvt': (deit_style_file(vvt), dict(type='VVT', arch=VVT_ARCH),
                lambda m: m.stages[1].blocks[1].attn.q_proj.weight, vvt.block2[1].attn.q_proj),
        'lit-ti': (deit_style_file(lit_ti, lit_ti=True),
                   dict(type='LIT', arch=LIT_TI_ARCH, pretrain_img_size=64),
                   lambda m: m.stages[1].downsample.conv_offset.weight,
                   lit_ti.patch_embed2.dconv.conv_offset),
        'lit-s': (swin_style_file(lit_s, yacs_config),
                  dict(type='LIT', arch=LIT_ARCH, pretrain_img_size=64),
                  lambda m: m.stages[2].blocks[1].attn.qkv.weight,
                  lit_s.layers[2].blocks[1].attn.qkv),
    }


BUILDERS = {'VVT': VVT, 'LIT': LIT}


@pytest.mark.parametrize('name', ['vvt', 'lit-ti', 'lit-s'])
def test_init_cfg_pretrained_loads_the_authors_file(tmp_path, yacs_config, name):
    checkpoint, backbone, ours, theirs = _cases(yacs_config)[name]
    path = tmp_path / f'{name}.pth'
    torch.save(checkpoint, path)
    yacs_config.remove()
    kwargs = {k: v for k, v in backbone.items() if k != 'type'}
    model = BUILDERS[backbone['type']](init_cfg=dict(type='Pretrained', checkpoint=str(path)),
                                       **kwargs)
    model.init_weights()
    torch.testing.assert_close(ours(model), theirs.weight, rtol=0, atol=0)
    assert 'yacs' not in sys.modules


@pytest.mark.parametrize('name,converter', [('vvt', 'vvt2mmsparsevit.py'),
                                            ('lit-ti', 'lit2mmsparsevit.py'),
                                            ('lit-s', 'lit2mmsparsevit.py')])
def test_converter_takes_the_authors_file(tmp_path, yacs_config, name, converter, monkeypatch):
    checkpoint, backbone, ours, theirs = _cases(yacs_config)[name]
    source, converted = tmp_path / f'{name}.pth', tmp_path / f'{name}_ours.pth'
    torch.save(checkpoint, source)
    yacs_config.remove()
    tool = load_tool(f'model_converters/{converter}')
    argv = [str(source), str(converted)]
    monkeypatch.setattr(sys, 'argv', [converter, *argv])
    tool.main()
    state_dict = torch.load(converted, weights_only=True)['state_dict']
    kwargs = {k: v for k, v in backbone.items() if k != 'type'}
    model = BUILDERS[backbone['type']](**kwargs)
    model.load_state_dict(model.convert_state_dict(state_dict)[0], strict=False)
    torch.testing.assert_close(ours(model), theirs.weight, rtol=0, atol=0)


@pytest.mark.parametrize('style', ['deit', 'swin'])
def test_load_from_takes_a_whole_detector_saved_the_authors_way(tmp_path, yacs_config, style):
    """A detector trained with the authors' scripts' checkpoint format, given as load_from."""
    cfg = Config.fromfile(str(DET_CONFIG))
    cfg.work_dir = str(tmp_path / 'work')
    init_default_scope(cfg.default_scope)
    trained = importlib.import_module('mmdet.registry').MODELS.build(cfg.model)
    with torch.no_grad():
        for param in trained.parameters():
            param.add_(torch.randn_like(param))
    saved = (deit_style_file(trained) if style == 'deit'
             else swin_style_file(trained, yacs_config))
    path = tmp_path / 'detector.pth'
    torch.save(saved, path)
    yacs_config.remove()
    cfg.load_from = str(path)
    runner = Runner.from_cfg(harden_train_config(cfg))
    runner.load_or_resume()
    for (name, ours), theirs in zip(runner.model.state_dict().items(),
                                    trained.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=name)
