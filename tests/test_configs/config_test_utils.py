# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Helpers shared by the config tests: the shipped-config inventory, fixture data, and the
rewrite that points a shipped config at that data with small images."""
import importlib
from pathlib import Path
from typing import Any, Dict, List

import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from tool_test_utils import load_tool

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_ROOT = REPO_ROOT / 'configs'

BACKBONE_TOKENS = ('vvt-t', 'vvt-s', 'lit-ti', 'lit-s', 'kvt-swin-t', 'kvt-pvtv2-b2', 'swin-t',
                   'pvtv2-b2')
# (folder, file name pattern, default scope) of every task this package ships configs for.
TASKS = (
    ('retinanet', 'retinanet_{}_fpn_1x_coco.py', 'mmdet'),
    ('mask_rcnn', 'mask-rcnn_{}_fpn_1x_coco.py', 'mmdet'),
    ('fpn', 'fpn_{}_4xb4-80k_ade20k-512x512.py', 'mmseg'),
    ('upernet', 'upernet_{}_4xb4-160k_ade20k-512x512.py', 'mmseg'),
)
EXPECTED_CONFIGS = tuple(
    CONFIG_ROOT / folder / pattern.format(token) for folder, pattern, _ in TASKS
    for token in BACKBONE_TOKENS)

# Module that defines each backbone family's registered class; a config of a family whose
# module has not landed is skipped with this name in the message.
FAMILY_MODULES = {
    'mmsparsevit.VVT': 'mmsparsevit/models/backbones/vvt.py',
    'mmsparsevit.LIT': 'mmsparsevit/models/backbones/lit.py',
    'mmsparsevit.KVT': 'mmsparsevit/models/backbones/kvt.py',
}

# Fixture images are FIXTURE_SIZE pixels square. Every size in a shipped pipeline is scaled
# by the same factor, chosen so that the pipeline's reference short side (COCO 800, ADE20K
# crop 512) becomes FIXTURE_SIZE: the pipeline keeps its structure (multi-scale choices,
# crops, ratios) and only shrinks.
FIXTURE_SIZE = 96
REFERENCE_SHORT_SIDE = dict(mmdet=800, mmseg=512)
MIN_SIZE = 32
SIZE_KEYS = ('scale', 'scales', 'crop_size', 'size')
DEMO_COCO_CLASSES = ('circle', 'square', 'triangle')


def shipped_configs() -> List[Path]:
    """Every config under the task folders this package ships, sorted."""
    return sorted(p for folder, _, _ in TASKS for p in (CONFIG_ROOT / folder).glob('*.py'))


def task_scope(path: Path) -> str:
    """Default scope (``'mmdet'`` or ``'mmseg'``) a shipped config must have."""
    for folder, _, scope in TASKS:
        if path.parent.name == folder:
            return scope
    raise ValueError(f'{path} is not in a shipped config folder')


def config_id(path: Path) -> str:
    return f'{path.parent.name}/{path.stem}'


def backbone_types(model_cfg: Dict) -> List[str]:
    """Registry types of the backbone and, for a wrapper such as KVT, of what it wraps."""
    types = []
    backbone = model_cfg['backbone']
    while isinstance(backbone, dict):
        types.append(backbone['type'])
        backbone = backbone.get('backbone')
    return types


def missing_backbone_modules(model_cfg: Dict) -> List[str]:
    """Repository paths of the backbone modules a config needs that do not exist yet."""
    return [
        FAMILY_MODULES[t] for t in backbone_types(model_cfg)
        if t in FAMILY_MODULES and not (REPO_ROOT / FAMILY_MODULES[t]).is_file()
    ]


def load_demo_data_module():
    """Import tools/dataset_converters/make_demo_data.py (tools/ is not a package)."""
    return load_tool('dataset_converters/make_demo_data.py')


def make_fixture_data(root: Path) -> Path:
    """Write two training and one validation image of each demo dataset under ``root``."""
    demo = load_demo_data_module()
    for name in ('coco', 'ade'):
        demo.make_demo_dataset(
            name, root / name, num_train=2, num_val=1, size=FIXTURE_SIZE, max_objects=3,
            seed=0)
    return root


def _scaled(value: Any, factor: float) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return max(MIN_SIZE, int(round(value * factor)))
    if isinstance(value, (list, tuple)):
        return type(value)(_scaled(v, factor) for v in value)
    return value


def shrink_sizes(node: Any, factor: float) -> Any:
    """Scale every image size (``scale``, ``scales``, ``crop_size``, ``size``) in a nested
    pipeline / preprocessor config by ``factor``, in place."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in SIZE_KEYS and value is not None:
                node[key] = _scaled(value, factor)
            else:
                shrink_sizes(value, factor)
    elif isinstance(node, list):
        for item in node:
            shrink_sizes(item, factor)
    return node


def _tiny_loader(loader_cfg: Dict, batch_size: int) -> None:
    loader_cfg.update(batch_size=batch_size, num_workers=0, persistent_workers=False)


def point_at_fixture(cfg: Config, data_root: Path) -> Config:
    """Rewrite a shipped config's data pointers to the fixture data, with tiny loaders and
    every pipeline size scaled down. The backbone, neck and heads stay as shipped, except
    that detection heads predict the fixture's classes and keep every test-time box."""
    scope = cfg.default_scope
    factor = FIXTURE_SIZE / REFERENCE_SHORT_SIDE[scope]
    for name in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        # Two training images: UperNet's global-pooling branch has a BatchNorm over a 1x1
        # map, which needs more than one value per channel in training.
        _tiny_loader(cfg[name], batch_size=2 if name == 'train_dataloader' else 1)
        dataset = cfg[name].dataset
        shrink_sizes(dataset.pipeline, factor)
        if scope == 'mmdet':
            split = 'train' if name == 'train_dataloader' else 'val'
            dataset.update(
                data_root=str(data_root / 'coco'),
                ann_file=f'annotations/instances_{split}.json',
                data_prefix=dict(img=f'{split}/'),
                metainfo=dict(classes=DEMO_COCO_CLASSES))
        else:
            dataset.data_root = str(data_root / 'ade')
    shrink_sizes(cfg.model.data_preprocessor, factor)
    if scope == 'mmdet':
        for name in ('val_evaluator', 'test_evaluator'):
            cfg[name].ann_file = str(data_root / 'coco' / 'annotations' / 'instances_val.json')
        # The heads predict the fixture's classes, as for any custom COCO-format dataset.
        heads = [cfg.model.get('bbox_head')]
        if 'roi_head' in cfg.model:
            heads = [cfg.model.roi_head.bbox_head, cfg.model.roi_head.get('mask_head')]
        for head in filter(None, heads):
            head.num_classes = len(DEMO_COCO_CLASSES)
        # An untrained detector scores every box below the shipped 0.05 threshold, which
        # would leave the COCO metric nothing to evaluate.
        test_cfg = cfg.model.test_cfg
        (test_cfg.rcnn if 'rcnn' in test_cfg else test_cfg).score_thr = 0.0
    return cfg


def build_model(cfg: Config) -> torch.nn.Module:
    """Build ``cfg.model`` with the MODELS registry of the config's default scope, the way
    mmengine's Runner does (nested builds then resolve in that scope too)."""
    init_default_scope(cfg.default_scope)
    return importlib.import_module(f'{cfg.default_scope}.registry').MODELS.build(cfg.model)
