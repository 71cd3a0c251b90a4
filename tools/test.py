# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Evaluate a checkpoint of a detector (mmdet) or a segmentor (mmseg) on the config's test set.

The checkpoint may be a path or a URL of any scheme mmengine knows, in this package's layout or
as the LIT authors released their mmdet 2.x / mmseg 0.x models (converted on load). It must fit
the model: weights it leaves unloaded stop the run unless ``--allow-partial-checkpoint``.

Examples:
    python tools/test.py CONFIG CHECKPOINT
    python tools/test.py CONFIG CHECKPOINT --out results.pkl --show-dir vis
    python tools/test.py CONFIG CHECKPOINT --tta
"""
import argparse
import inspect
import os.path as osp
from functools import partial
from typing import Dict, Optional, Sequence

from mmengine.config import Config, ConfigDict
from mmengine.registry import HOOKS, METRICS

import mmsparsevit.models  # noqa: F401  registers this package's modules
from mmsparsevit.runtime import ConfigCheckError, harden_test_config
from mmsparsevit.runtime.cli import (add_common_args, build_runner, load_config, parse_common,
                                     run_reporting_input_errors)

# mmdet's dumper stores masks as RLE; mmengine's stores predictions as they are.
_DUMP_METRIC = {'mmdet': 'DumpDetResults'}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test (and evaluate) a checkpoint')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', help='dump all predictions to this pickle file (.pkl)')
    parser.add_argument(
        '--show-dir',
        help='draw predictions on the test images into this folder (mmseg writes them under '
        '<show-dir>/vis_data/vis_image)')
    parser.add_argument(
        '--tta',
        action='store_true',
        help="test-time augmentation with the config's tta_model and tta_pipeline (the "
        'RetinaNet configs: flip; the segmentation configs: scales 0.5-1.75 and flip)')
    parser.add_argument(
        '--allow-partial-checkpoint',
        action='store_true',
        help='evaluate even when the checkpoint leaves model weights unloaded (by default '
        'that stops the run, naming them)')
    add_common_args(parser)
    args = parse_common(parser, argv)
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        parser.error(f'--out must name a .pkl or .pickle file, got {args.out}')
    return args


def test_config(args: argparse.Namespace) -> Config:
    """The config with the checkpoint and the visualisation options applied."""
    if '://' not in args.checkpoint and not osp.isfile(args.checkpoint):
        raise ConfigCheckError(f'checkpoint {args.checkpoint} does not exist')
    cfg = load_config(args)
    if args.tta:
        cfg = with_test_time_augmentation(cfg)
    cfg.load_from = args.checkpoint
    if args.show_dir is not None:
        hook = (cfg.get('default_hooks') or {}).get('visualization')
        if hook is None:
            raise ConfigCheckError('--show-dir: the config has no '
                                   'default_hooks.visualization hook')
        hook.draw = True
        show_dir = osp.abspath(args.show_dir)
        # DetVisualizationHook writes every test image to its own folder; SegVisualizationHook
        # draws every `interval`-th batch through the visualizer's storage backends.
        if 'test_out_dir' in _hook_arguments(cfg, hook):
            hook.test_out_dir = show_dir
        else:
            hook.interval = 1
            cfg.visualizer.save_dir = show_dir
    return cfg


def with_test_time_augmentation(cfg: Config) -> Config:
    """Wrap the model in the config's ``tta_model`` and test on its ``tta_pipeline``, as
    mmdet's and mmseg's own test tools do, but without inventing settings a config lacks."""
    roi_head = cfg.model.get('roi_head') or {}
    if cfg.get('default_scope') == 'mmdet' and roi_head.get('mask_head') is not None:
        raise ConfigCheckError(
            '--tta: mmdet 3.3\'s DetTTAModel merges boxes only and refuses instance masks, so '
            'a Mask R-CNN (roi_head.mask_head) cannot be tested with TTA; test without --tta')
    missing = [key for key in ('tta_model', 'tta_pipeline') if key not in cfg]
    if missing:
        raise ConfigCheckError(
            f'--tta: the config sets no {" and no ".join(missing)}; add them (see '
            'configs/_base_/tta/coco_detection_flip.py, or mmseg\'s ADE20K dataset config) or '
            'test without --tta')
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    dataset = cfg.test_dataloader.dataset
    while 'dataset' in dataset:
        dataset = dataset['dataset']
    dataset.pipeline = cfg.tta_pipeline
    return cfg


def _hook_arguments(cfg: Config, hook: Dict) -> Sequence[str]:
    with HOOKS.switch_scope_and_registry(cfg.get('default_scope')) as registry:
        hook_class = registry.get(hook['type'])
    return tuple(inspect.signature(hook_class.__init__).parameters)


def test(args: argparse.Namespace) -> Dict:
    harden = partial(harden_test_config, allow_partial_checkpoint=args.allow_partial_checkpoint)
    runner = build_runner(test_config(args), 'test', harden)
    if args.out is not None:
        metric_type = _DUMP_METRIC.get(runner.cfg.get('default_scope'), 'DumpResults')
        runner.test_evaluator.metrics.append(
            METRICS.build(dict(type=metric_type, out_file_path=args.out)))
    return runner.test()


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    run_reporting_input_errors(lambda: test(args))


if __name__ == '__main__':
    main()
