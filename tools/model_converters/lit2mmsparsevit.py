# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Convert an official LIT checkpoint to mmsparsevit's ``LIT`` layout.

Accepts the authors' ImageNet releases (lit_ti.pth, lit_s.pth, lit_m.pth, lit_b.pth) and their
COCO / ADE20K releases (only the backbone is kept). Position embeddings and relative-position
tables keep their stored size; ``LIT.init_weights`` resizes them to the model it loads into.

Example:
    python tools/model_converters/lit2mmsparsevit.py lit_s.pth pretrained/lit_s_mmsparsevit.pth
"""
import argparse
import os.path as osp

import torch
from mmengine.runner.checkpoint import CheckpointLoader
from mmengine.utils import mkdir_or_exist

import mmsparsevit  # noqa: F401  (installs the checkpoint allow-list)
from mmsparsevit.models.backbones.lit import convert_lit_checkpoint


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Convert an official LIT checkpoint to the mmsparsevit layout')
    parser.add_argument('src', help='official checkpoint (path or URL)')
    parser.add_argument('dst', help='output path')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    checkpoint = CheckpointLoader.load_checkpoint(args.src, map_location='cpu')
    try:
        state_dict, dropped = convert_lit_checkpoint(checkpoint)
    except (TypeError, ValueError) as error:
        raise SystemExit(f'{args.src}: {error}') from error
    mkdir_or_exist(osp.dirname(osp.abspath(args.dst)))
    torch.save({'state_dict': state_dict, 'meta': {'converted_from': args.src}}, args.dst)
    print(f'{args.src} -> {args.dst}: {len(state_dict)} tensors')
    for key, reason in dropped.items():
        print(f'  not carried over: {key} ({reason})')


if __name__ == '__main__':
    main()
