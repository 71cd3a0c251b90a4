# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Export a config's detector, segmentor or backbone to ONNX, checked in onnxruntime.

The detector (RetinaNet) and segmentor graphs take one image ``(1, 3, H, W)`` as the test
pipeline hands it to the model (float, the loaded image's channel order and value range,
already resized to H x W) and return post-processed predictions: ``boxes``, ``scores``,
``labels`` (what ``model.predict`` returns) or ``seg_logits`` and ``seg_map``. ``--part
backbone`` exports the backbone alone (its input is the normalised image).

Every export is run in onnxruntime on a random image and refused (exit status 1, no file
written) unless it matches PyTorch within 1e-4 relative (max |diff| / max |reference|);
``--dynamic`` also checks a second size. ``--verify`` prints these errors and, for a detector
or segmentor, also compares the graph with mmdet's / mmseg's own ``model.predict``.

Example:
    python tools/deployment/pytorch2onnx.py \
        configs/demo/retinanet_vvt-demo_fpn_shapes-coco.py work_dirs/demo/iter_2000.pth \
        --shape 128 128 --output retinanet_vvt-demo.onnx --verify
"""
import argparse
import os
import os.path as osp
import sys
from typing import Optional, Sequence

import torch
from mmengine.config import Config, DictAction

import mmsparsevit.models  # noqa: F401  registers this package's modules
from mmsparsevit.apis.export import (DEFAULT_OPSET, RELATIVE_TOLERANCE, DetectorExport,
                                     ExportError, SegmentorExport, compare, export_onnx,
                                     predict_outputs, run_onnx)
from mmsparsevit.apis.inference import init_model
from mmsparsevit.engine import WeightsMismatchError

OUTPUT_NAMES = dict(mmdet=('boxes', 'scores', 'labels'), mmseg=('seg_logits', 'seg_map'))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Export a model to ONNX (checked in '
                                     'onnxruntime)')
    parser.add_argument('config', help='config file of the model')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--shape', type=int, nargs=2, required=True, metavar=('H', 'W'),
                        help='input height and width of the exported graph')
    parser.add_argument('--output', help='ONNX file (default: the config name with .onnx)')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET,
                        help=f'ONNX opset (default {DEFAULT_OPSET}; LIT needs 19 or later)')
    parser.add_argument('--dynamic', action='store_true',
                        help='make H and W dynamic axes (refused where the graph is '
                        'specialised to --shape; checked at a second size)')
    parser.add_argument('--verify', action='store_true',
                        help='print the relative errors against PyTorch and, for a detector '
                        'or segmentor, against model.predict')
    parser.add_argument('--part', choices=('model', 'backbone'), default='model',
                        help='export the whole model (default) or its backbone only')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, as in tools/test.py')
    args = parser.parse_args(argv)
    if not osp.isfile(args.config):
        parser.error(f'config file {args.config} does not exist')
    if '://' not in args.checkpoint and not osp.isfile(args.checkpoint):
        parser.error(f'checkpoint file {args.checkpoint} does not exist')
    if min(args.shape) < 1:
        parser.error(f'--shape must be positive, got {args.shape}')
    if args.output is None:
        args.output = osp.splitext(osp.basename(args.config))[0] + '.onnx'
    return args


def export_module(model: torch.nn.Module, scope: str, part: str):
    """The module to export and its output names."""
    if part == 'backbone':
        return model.backbone, None
    wrapper = DetectorExport if scope == 'mmdet' else SegmentorExport
    return wrapper(model), OUTPUT_NAMES[scope]


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    try:
        model = init_model(cfg, args.checkpoint)
        module, names = export_module(model, cfg.default_scope, args.part)
        _, errors = export_onnx(module, args.shape, args.output, args.opset, args.dynamic,
                                output_names=names)
    except (ExportError, WeightsMismatchError, ValueError) as err:
        sys.exit(f'error: {err}')
    if args.verify:
        for (height, width), per_output in errors.items():
            print(f'onnxruntime vs PyTorch at {height}x{width}: {per_output}')
        if names is not None:
            image = torch.rand(1, 3, *args.shape, generator=torch.Generator().manual_seed(1))
            image = image * 255
            against = compare(predict_outputs(module, image), run_onnx(args.output, image),
                              names)
            print(f'onnxruntime vs model.predict at {args.shape[0]}x{args.shape[1]}: '
                  f'{against}')
            if max(against.values()) > RELATIVE_TOLERANCE:
                os.remove(args.output)
                sys.exit(f'error: the graph differs from model.predict beyond the tolerance '
                         f'{RELATIVE_TOLERANCE}')
    axes = 'dynamic H, W' if args.dynamic else f'{args.shape[0]}x{args.shape[1]}'
    print(f'wrote {args.output} (opset {args.opset}, {axes}; onnxruntime matches PyTorch '
          f'within {RELATIVE_TOLERANCE} relative)')


if __name__ == '__main__':
    main()
