# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Convert an official VVT checkpoint to mmsparsevit's ``VVT`` layout.

Accepts the authors' ImageNet releases (vvt_tiny / small / medium / large ``.pth``, state
dict at the top level or under ``model``); the classification head is dropped. The result
is checked key for key and shape for shape against the preset it matches (or ``--arch``).

Example:
    python tools/model_converters/vvt2mmsparsevit.py vvt_small.pth pretrained/vvt_small.pth
"""
import argparse
import os.path as osp
import re
from typing import Optional, Sequence

import torch
from mmengine.runner.checkpoint import CheckpointLoader
from mmengine.utils import mkdir_or_exist

import mmsparsevit  # noqa: F401  (installs the checkpoint allow-list)
from mmsparsevit.models.backbones.vvt import VVT, convert_vvt_checkpoint


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Convert an official VVT checkpoint to the mmsparsevit layout')
    parser.add_argument('src', help='official checkpoint (path or URL)')
    parser.add_argument('dst', help='output path')
    parser.add_argument(
        '--arch',
        choices=('tiny', 'small', 'medium', 'large'),
        help='preset to verify against (default: the preset whose depths match)')
    return parser.parse_args(argv)


def _stage_depths(state_dict: dict) -> tuple:
    blocks = {}
    for key in state_dict:
        match = re.match(r'stages\.(\d+)\.blocks\.(\d+)\.', key)
        if match:
            stage, block = int(match[1]), int(match[2])
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    return tuple(blocks.get(stage, 0) for stage in range(max(blocks, default=-1) + 1))


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    checkpoint = CheckpointLoader.load_checkpoint(args.src, map_location='cpu')
    try:
        state_dict, dropped = convert_vvt_checkpoint(checkpoint)
    except (TypeError, ValueError) as error:
        raise SystemExit(f'{args.src}: {error}') from error
    depths = _stage_depths(state_dict)
    arch = args.arch or next(
        (name for name in ('tiny', 'small', 'medium', 'large')
         if VVT.arch_zoo[name]['depths'] == depths), None)
    if arch is None:
        raise SystemExit(f'{args.src}: stage depths {depths} match no VVT preset; pass --arch')
    with torch.device('meta'):
        model = VVT(arch=arch)
    try:
        model.check_state_dict(state_dict, source=args.src)
    except ValueError as error:
        raise SystemExit(str(error)) from error
    mkdir_or_exist(osp.dirname(osp.abspath(args.dst)))
    torch.save({'state_dict': state_dict, 'meta': {'converted_from': args.src, 'arch': arch}},
               args.dst)
    print(f'{args.src} -> {args.dst}: {len(state_dict)} tensors, VVT-{arch} '
          f'({sum(v.numel() for v in state_dict.values()):,} parameters)')
    for key, reason in dropped.items():
        print(f'  not carried over: {key} ({reason})')


if __name__ == '__main__':
    main()
