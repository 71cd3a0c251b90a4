# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Convert the LIT authors' trained detectors and segmentors to an mmsparsevit config's model.

Takes a whole-model release of zhuang-group/LIT (RetinaNet / Mask R-CNN trained with their
mmdet 2.11, Semantic FPN with their mmseg 0.13: retina_lit_ti.pth, retina_lit_s.pth,
mask_rcnn_lit_ti.pth, mask_rcnn_lit_s.pth, sem_fpn_lit_ti.pth, sem_fpn_lit_s.pth), converts it
to the model CONFIG builds (backbone keys renamed, position parameters resized to the config;
neck and head keys are the same in mmdet 3.x / mmseg 1.x), checks it key for key and shape for
shape, and writes a plain checkpoint that ``tools/test.py`` and ``tools/inference.py`` load as
it is. (``tools/test.py`` also converts the authors' files on the fly.)

Example:
    python tools/model_converters/lit_dense2mmsparsevit.py \
        configs/retinanet/retinanet_lit-ti_fpn_1x_coco.py retina_lit_ti.pth \
        checkpoints/retinanet_lit-ti_fpn_1x_coco_authors.pth
"""
import argparse
import importlib
import os.path as osp
from typing import Mapping, Optional, Sequence

import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner.checkpoint import CheckpointLoader
from mmengine.utils import mkdir_or_exist
from torch import nn

import mmsparsevit  # noqa: F401  (installs the checkpoint allow-list)
from mmsparsevit.models.dense_checkpoint import convert_dense_checkpoint
from mmsparsevit.utils.state_dict import match_state_dict


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convert a LIT authors' detector/segmentor checkpoint to the model of an "
        'mmsparsevit config')
    parser.add_argument('config', help='mmsparsevit config the checkpoint is for')
    parser.add_argument('src', help="the authors' checkpoint (path or URL)")
    parser.add_argument('dst', help='output path')
    return parser.parse_args(argv)


def build_model(cfg: Config) -> nn.Module:
    """``cfg.model`` on the meta device, by the registry of the config's default scope (as the
    Runner builds it); only the names and shapes of its tensors are used."""
    scope = cfg.get('default_scope')
    if scope not in ('mmdet', 'mmseg'):
        raise SystemExit(f'{cfg.filename}: default_scope is {scope!r}; this tool handles mmdet '
                         'detectors and mmseg segmentors')
    init_default_scope(scope)
    registry = importlib.import_module(f'{scope}.registry').MODELS
    with torch.device('meta'):
        return registry.build(cfg.model)


def converted_meta(src: str, config: str, meta: Mapping) -> dict:
    """The new file's meta: where it came from, and the class names (and palette) for
    mmdet's ``init_detector`` / mmseg's ``init_model``, which read ``dataset_meta``."""
    result = {'converted_from': src, 'config': config}
    dataset_meta = {}
    for old, new in (('CLASSES', 'classes'), ('PALETTE', 'palette')):
        if meta.get(old) is not None:
            dataset_meta[new] = meta[old]
    if dataset_meta:
        result['dataset_meta'] = dataset_meta
    for key in ('epoch', 'iter', 'mmdet_version', 'mmseg_version'):
        if key in meta:
            result[f'source_{key}'] = meta[key]
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    # Load first: a file the safe loader refuses is rejected before any model is built.
    checkpoint = CheckpointLoader.load_checkpoint(args.src, map_location='cpu')
    cfg = Config.fromfile(args.config)
    model = build_model(cfg)
    try:
        state_dict, notes = convert_dense_checkpoint(checkpoint, model)
    except (TypeError, ValueError) as error:
        raise SystemExit(f'{args.src}: {error}') from error
    match = match_state_dict(model.state_dict(), state_dict)
    if not match.exact:
        raise SystemExit(f'{args.src} does not fit the model of {args.config}: '
                         f'{match.describe()}')
    meta = checkpoint.get('meta') if isinstance(checkpoint, Mapping) else None
    mkdir_or_exist(osp.dirname(osp.abspath(args.dst)))
    torch.save({'state_dict': state_dict,
                'meta': converted_meta(args.src, args.config, meta or {})}, args.dst)
    parameters = sum(value.numel() for value in state_dict.values())
    print(f'{args.src} -> {args.dst}: {len(state_dict)} tensors ({parameters:,} values), '
          f'{len(notes)} notes')
    for key, note in notes.items():
        print(f'  {key}: {note}')


if __name__ == '__main__':
    main()
