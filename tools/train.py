# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Train a detector (mmdet) or a segmentor (mmseg); the config's ``default_scope`` decides.

Examples:
    python tools/train.py configs/demo/retinanet_lit-demo_fpn_shapes-coco.py
    python tools/train.py CONFIG --resume                      # latest checkpoint in the work dir
    python tools/train.py CONFIG --resume work_dirs/x/iter_500.pth
    python tools/train.py CONFIG --cfg-options train_dataloader.batch_size=4
    python tools/train.py CONFIG --cfg-options compile=True          # torch.compile the train step
"""
import argparse
import os.path as osp
from typing import Optional, Sequence

from mmengine.config import Config
from mmengine.device import get_device

import mmsparsevit.models  # noqa: F401  registers this package's modules
from mmsparsevit.runtime import ConfigCheckError, harden_train_config
from mmsparsevit.runtime.cli import (add_common_args, build_runner, load_config, parse_common,
                                     run_reporting_input_errors)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a detector or a segmentor')
    parser.add_argument('config', help='train config file path')
    parser.add_argument(
        '--resume',
        nargs='?',
        const='auto',
        help='resume from this checkpoint; without a path, from the latest checkpoint in '
        'the work dir')
    parser.add_argument('--amp', action='store_true',
                        help='automatic mixed precision training (needs a GPU)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate by the actual total batch size '
                        '(config key auto_scale_lr.base_batch_size)')
    add_common_args(parser)
    args = parse_common(parser, argv)
    if args.amp and get_device() == 'cpu':
        parser.error('--amp needs a GPU (or an NPU/MLU/MUSA device); none is available')
    return args


def train_config(args: argparse.Namespace) -> Config:
    """The config with the training options of the command line applied."""
    cfg = load_config(args)
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if args.auto_scale_lr:
        if not (cfg.get('auto_scale_lr') or {}).get('base_batch_size'):
            raise ConfigCheckError('--auto-scale-lr: the config sets no '
                                   'auto_scale_lr.base_batch_size')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        if '://' not in args.resume and not osp.isfile(args.resume):
            raise ConfigCheckError(f'--resume: checkpoint {args.resume} does not exist')
        cfg.resume = True
        cfg.load_from = args.resume
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    run_reporting_input_errors(
        lambda: build_runner(train_config(args), 'train', harden_train_config).train())


if __name__ == '__main__':
    main()
