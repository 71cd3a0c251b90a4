# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Helpers for the tools tests: load a tool script as a module, make fixture data, run a tool."""
import argparse
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Sequence

import torch
from mmengine.config import Config, DictAction
from mmengine.registry import init_default_scope

REPO_ROOT = Path(__file__).resolve().parents[2]
DET_CONFIG = REPO_ROOT / 'configs' / 'demo' / 'retinanet_vvt-demo_fpn_shapes-coco.py'
SEG_CONFIG = REPO_ROOT / 'configs' / 'demo' / 'fpn_vvt-demo_shapes-ade20k.py'
FIXTURE_SIZE = 64
TOOL_TIMEOUT_S = 600


def load_tool(relative_path: str) -> ModuleType:
    """Import a script under tools/ (not a package) as a module."""
    path = REPO_ROOT / 'tools' / relative_path
    spec = importlib.util.spec_from_file_location(f'tool_{path.stem}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_fixture_data(root: Path, num_train: int = 4, num_val: int = 2) -> Path:
    """Write small COCO and ADE20K demo datasets under ``root``/{coco,ade}."""
    demo = load_tool('dataset_converters/make_demo_data.py')
    for name in ('coco', 'ade'):
        demo.make_demo_dataset(name, root / name, num_train=num_train, num_val=num_val,
                               size=FIXTURE_SIZE, max_objects=3, seed=0)
    return root


def data_options(config: Path, data_root: Path) -> list:
    """``--cfg-options`` entries that point a demo config at fixture data, with tiny loaders."""
    loaders = ('train_dataloader', 'val_dataloader', 'test_dataloader')
    options = [f'{loader}.{key}' for loader in loaders
               for key in ('num_workers=0', 'persistent_workers=False', 'batch_size=2')]
    if config == DET_CONFIG:
        coco = data_root / 'coco'
        options += [f'{loader}.dataset.data_root={coco}/' for loader in loaders]
        options += [f'{name}.ann_file={coco}/annotations/instances_val.json'
                    for name in ('val_evaluator', 'test_evaluator')]
    else:
        options += [f'{loader}.dataset.data_root={data_root / "ade"}/' for loader in loaders]
        options.append(f'model.data_preprocessor.size=({FIXTURE_SIZE},{FIXTURE_SIZE})')
    return options


def run_tool(script: str, args: Sequence[str], cwd: Path = REPO_ROOT
             ) -> subprocess.CompletedProcess:
    """Run ``tools/<script>`` with the test's Python; output is captured as text."""
    return subprocess.run([sys.executable, str(REPO_ROOT / 'tools' / script), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)


def fixture_config(config: Path, data_root: Path, *options: str) -> Config:
    """A demo config with :func:`data_options` and ``options`` applied as the tools do."""
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    cfg = Config.fromfile(config)
    parsed = parser.parse_args(['--cfg-options', *data_options(config, data_root), *options])
    cfg.merge_from_dict(parsed.cfg_options)
    return cfg


def untrained_state_dict(config: Path, seed: int = 0) -> dict:
    """The state dict of ``config``'s model as built (random weights, seeded), through the
    registry of its toolbox."""
    cfg = Config.fromfile(str(config))
    init_default_scope(cfg.default_scope)
    torch.manual_seed(seed)
    return importlib.import_module(f'{cfg.default_scope}.registry').MODELS.build(
        cfg.model).state_dict()


def save_untrained_checkpoint(config: Path, path: Path) -> Path:
    """Write ``{'state_dict': untrained_state_dict(config), 'meta': {}}`` to ``path``."""
    torch.save({'state_dict': untrained_state_dict(config), 'meta': {}}, path)
    return path
