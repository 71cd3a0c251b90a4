# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Every shipped COCO / ADE20K config parses, carries the training recipe its name promises,
builds its model through the registry of its default scope, and runs one training step and
one test step (with metric) on fixture data."""
import copy
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch
from mmengine.config import Config
from mmengine.evaluator import Evaluator
from mmengine.model import revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import PARAM_SCHEDULERS
from mmengine.runner import Runner

from config_test_utils import (BACKBONE_TOKENS, CONFIG_ROOT, EXPECTED_CONFIGS, FIXTURE_SIZE,
                               REPO_ROOT, backbone_types, build_model, config_id,
                               make_fixture_data, missing_backbone_modules, point_at_fixture,
                               shipped_configs, task_scope)

CONFIGS = shipped_configs()
# Mask R-CNN and UperNet steps cost several seconds each on 2 CPU cores; they run in CI.
HEAVY_TASKS = ('mask_rcnn', 'upernet')


def step_params():
    for path in CONFIGS:
        marks = [pytest.mark.slow] if path.parent.name in HEAVY_TASKS else []
        yield pytest.param(path, id=config_id(path), marks=marks)


@lru_cache(maxsize=None)
def _parsed(path: Path) -> Config:
    return Config.fromfile(str(path))


def parse(path: Path) -> Config:
    """The config at ``path``, parsed once per session; callers get their own copy."""
    return copy.deepcopy(_parsed(path))


def load(path: Path) -> Config:
    """Like ``parse``, skipping a config whose backbone module has not landed yet."""
    cfg = parse(path)
    missing = missing_backbone_modules(cfg.model)
    if missing:
        pytest.skip(f'{config_id(path)} needs {", ".join(missing)}, which is not in the '
                    'repository yet')
    return cfg


@lru_cache(maxsize=None)
def state_dict_shapes(path: Path) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
    model = build_model(load(path))
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


@pytest.fixture(scope='module')
def fixture_data(tmp_path_factory) -> Path:
    return make_fixture_data(tmp_path_factory.mktemp('config_fixture_data'))


def test_every_expected_config_is_shipped():
    assert len(CONFIGS) >= len(EXPECTED_CONFIGS) == 4 * len(BACKBONE_TOKENS) == 32
    missing = [str(p.relative_to(REPO_ROOT)) for p in EXPECTED_CONFIGS if not p.is_file()]
    assert not missing, f'configs not shipped: {missing}'


def documented_checkpoints() -> set:
    readme = (CONFIG_ROOT / 'README.md').read_text(encoding='utf-8')
    return set(re.findall(r'`((?:checkpoints/|https://)[\w.\-/:]+\.pth)`', readme))


def pretrained_checkpoints(model_cfg: Dict) -> list:
    found = []
    node = model_cfg['backbone']
    while isinstance(node, dict):
        init_cfg = node.get('init_cfg')
        if init_cfg:
            found.append(init_cfg)
        node = node.get('backbone')
    return found


@pytest.mark.parametrize('path', [pytest.param(p, id=config_id(p)) for p in CONFIGS])
def test_config_parses_with_its_recipe(path):
    cfg = parse(path)
    scope = task_scope(path)
    assert cfg.default_scope == scope
    assert cfg.optim_wrapper.optimizer.type == 'AdamW'
    name = path.stem
    if scope == 'mmdet':
        assert cfg.train_cfg.max_epochs == 12
        steps = [s for s in cfg.param_scheduler if s.type == 'MultiStepLR']
        assert len(steps) == 1 and list(steps[0].milestones) == [8, 11]
        assert cfg.param_scheduler[0].type == 'LinearLR'  # warm-up
        assert cfg.train_dataloader.batch_size == 2  # 8 GPUs x 2, mmdet's 1x default
    else:
        iters = int(re.search(r'-(\d+)k_', name).group(1)) * 1000
        assert cfg.train_cfg.max_iters == iters
        assert cfg.param_scheduler[-1].type == 'PolyLR'
        assert cfg.param_scheduler[-1].end == iters
        assert cfg.train_dataloader.batch_size == 4  # 4xb4
        assert cfg.model.get('pretrained') is None  # the backbone's init_cfg loads weights
        assert tuple(cfg.crop_size) == (512, 512)
        assert tuple(cfg.model.data_preprocessor.size) == (512, 512)
        assert cfg.model.decode_head.num_classes == 150
    # One ImageNet checkpoint per backbone: its official URL, or a documented local path.
    inits = pretrained_checkpoints(cfg.model)
    assert len(inits) == 1, f'expected exactly one Pretrained init_cfg, got {inits}'
    assert inits[0].type == 'Pretrained'
    assert inits[0].checkpoint in documented_checkpoints(), (
        f'{inits[0].checkpoint} is not listed in configs/README.md')
    if any(t.startswith('mmsparsevit.') for t in backbone_types(cfg.model)):
        assert 'mmsparsevit.models' in cfg.custom_imports.imports
        assert cfg.custom_imports.allow_failed_imports is False


@pytest.mark.parametrize('path', [pytest.param(p, id=config_id(p)) for p in CONFIGS])
def test_config_backbone_family(path):
    """The file name's backbone token is the backbone the config builds."""
    token = re.match(r'[a-z\-]+_([a-z0-9\-]+)_', path.stem).group(1)
    cfg = parse(path)
    types = backbone_types(cfg.model)
    backbone = cfg.model.backbone
    expected = {
        'vvt-t': (['mmsparsevit.VVT'], dict(arch='tiny')),
        'vvt-s': (['mmsparsevit.VVT'], dict(arch='small')),
        'lit-ti': (['mmsparsevit.LIT'], dict(arch='tiny')),
        'lit-s': (['mmsparsevit.LIT'], dict(arch='small')),
        'swin-t': (['mmdet.SwinTransformer'], dict(embed_dims=96, depths=[2, 2, 6, 2])),
        'pvtv2-b2': (['mmdet.PyramidVisionTransformerV2'],
                     dict(embed_dims=64, num_layers=[3, 4, 6, 3])),
    }
    if token.startswith('kvt-'):
        assert types[0] == 'mmsparsevit.KVT'
        inner_types, inner_args = expected[token[len('kvt-'):]]
        assert types[1:] == inner_types
        backbone = backbone.backbone
    else:
        inner_types, inner_args = expected[token]
        assert types == inner_types
    for key, value in inner_args.items():
        actual = backbone[key]
        assert (list(actual) if isinstance(value, list) else actual) == value, key


KVT_PAIRS = [(p, p.with_name(p.name.replace('kvt-', ''))) for p in CONFIGS
             if '_kvt-' in p.name]


@pytest.mark.parametrize('kvt_path, baseline_path',
                         [pytest.param(k, b, id=config_id(k)) for k, b in KVT_PAIRS])
def test_kvt_config_is_its_baseline_with_knn_attention(kvt_path, baseline_path):
    """k-NN attention adds nothing to the model: same recipe, same state-dict keys/shapes."""
    kvt_cfg, base_cfg = parse(kvt_path), parse(baseline_path)
    assert kvt_cfg.model.backbone.backbone == base_cfg.model.backbone
    for key in ('optim_wrapper', 'param_scheduler', 'train_cfg', 'train_dataloader'):
        assert kvt_cfg[key] == base_cfg[key], key
    assert state_dict_shapes(kvt_path) == state_dict_shapes(baseline_path)


LIT_CONFIGS = [p for p in CONFIGS if '_lit-' in p.name]


@pytest.mark.parametrize('path', [pytest.param(p, id=config_id(p)) for p in LIT_CONFIGS])
def test_lit_offset_convs_learn_at_a_hundredth_of_the_lr(path):
    cfg = load(path)
    model = build_model(cfg)
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    base_lr = cfg.optim_wrapper.optimizer.lr
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {
        names[id(p)]: group['lr']
        for group in optim_wrapper.optimizer.param_groups for p in group['params']
    }
    offsets = [n for n in lr_of if 'conv_offset' in n]
    # Weight and bias of the offset conv in each of LIT's three token-merging layers.
    assert len(offsets) == 6, offsets
    for name, lr in lr_of.items():
        expected = base_lr * 0.01 if name in offsets else base_lr
        assert math.isclose(lr, expected, rel_tol=1e-9), (name, lr)


@pytest.mark.parametrize('path', list(step_params()))
def test_config_trains_and_tests_one_step(path, fixture_data):
    cfg = point_at_fixture(load(path), fixture_data)
    model = revert_sync_batchnorm(build_model(cfg))  # as mmengine's Runner does without DDP
    model.train()

    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    got_grad = set()
    for name, param in trainable.items():
        param.register_hook(lambda grad, name=name: got_grad.add(name))
    probe_name = next(n for n in trainable if n.startswith('backbone.'))
    probe_before = trainable[probe_name].detach().clone()

    train_loader = Runner.build_dataloader(cfg.train_dataloader, seed=0)
    batch = next(iter(train_loader))
    log_vars = model.train_step(batch, optim_wrapper)
    # Built after the step: a warm-up scheduler scales the lr down at construction, and
    # UperNet's 1e-6 start factor would make this one update too small to observe.
    for scheduler_cfg in cfg.param_scheduler:
        PARAM_SCHEDULERS.build(dict(scheduler_cfg, optimizer=optim_wrapper)).step()

    assert log_vars['loss'].ndim == 0 and torch.isfinite(log_vars['loss'])
    assert log_vars['loss'] > 0
    unused = sorted(set(trainable) - got_grad)
    if not cfg.get('find_unused_parameters', False):
        # DDP without find_unused_parameters fails on parameters that get no gradient.
        assert not unused, f'parameters without gradient: {unused[:10]}'
    assert not torch.equal(trainable[probe_name].detach(), probe_before), 'no update'

    model.eval()
    test_loader = Runner.build_dataloader(cfg.test_dataloader, seed=0)
    evaluator = Evaluator(cfg.test_evaluator)
    evaluator.dataset_meta = test_loader.dataset.metainfo
    batch = next(iter(test_loader))
    with torch.no_grad():
        outputs = model.test_step(batch)
    assert len(outputs) == 1
    if cfg.default_scope == 'mmdet':
        instances = outputs[0].pred_instances
        assert instances.bboxes.ndim == 2 and instances.bboxes.shape[1] == 4
        assert instances.scores.shape[0] == instances.bboxes.shape[0]
        if 'mask_head' in cfg.model.get('roi_head', {}):
            assert tuple(instances.masks.shape[1:]) == (FIXTURE_SIZE, FIXTURE_SIZE)
    else:
        assert tuple(outputs[0].pred_sem_seg.data.shape) == (1, FIXTURE_SIZE, FIXTURE_SIZE)
    evaluator.process(data_samples=outputs, data_batch=batch)
    metrics = evaluator.evaluate(len(test_loader.dataset))
    key = 'coco/bbox_mAP' if cfg.default_scope == 'mmdet' else 'mIoU'
    assert key in metrics, sorted(metrics)


# Whole-model parameter counts (millions) the LIT paper reports for its dense models.
LIT_PUBLISHED_PARAMS = {
    'retinanet/retinanet_lit-ti_fpn_1x_coco': 30,
    'retinanet/retinanet_lit-s_fpn_1x_coco': 39,
    'mask_rcnn/mask-rcnn_lit-ti_fpn_1x_coco': 40,
    'mask_rcnn/mask-rcnn_lit-s_fpn_1x_coco': 48,
    'fpn/fpn_lit-ti_4xb4-80k_ade20k-512x512': 24,
    'fpn/fpn_lit-s_4xb4-80k_ade20k-512x512': 32,
}


@pytest.mark.parametrize('name, millions', list(LIT_PUBLISHED_PARAMS.items()))
def test_lit_models_have_the_published_parameter_counts(name, millions):
    model = build_model(load(CONFIG_ROOT / f'{name}.py'))
    total = sum(p.numel() for p in model.parameters())
    assert round(total / 1e6) == millions, total
