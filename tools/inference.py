# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Run a trained detector or segmentor on one image and save the prediction drawn on it.

The config's ``default_scope`` decides the toolbox: detectors (mmdet) draw their
boxes (and masks, if the model predicts them) with class names and scores;
segmentors (mmseg) blend the class colours of the predicted map into the image.
The PNG has the size of the input image.

Example:
    python tools/inference.py CONFIG CHECKPOINT data/demo/coco/val/000001.jpg \
        --out prediction.png
"""
import argparse
import os
import os.path as osp
import sys
from typing import Optional, Sequence

import mmcv
import numpy as np
from mmengine.config import Config
from mmengine.registry import VISUALIZERS

import mmsparsevit.models  # noqa: F401  registers this package's modules
from mmsparsevit.apis.inference import init_model
from mmsparsevit.engine import WeightsMismatchError


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Draw a model\'s prediction on an image')
    parser.add_argument('config', help='config file of the model')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('image', help='input image')
    parser.add_argument('--out', required=True, help='output PNG file')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='draw boxes scoring at least this (detection only)')
    parser.add_argument('--opacity', type=float, default=0.5,
                        help='opacity of the class colours (segmentation only)')
    parser.add_argument('--device', default='cpu', help='e.g. cpu or cuda:0')
    parser.add_argument(
        '--allow-partial-checkpoint',
        action='store_true',
        help='draw even when the checkpoint leaves model weights unloaded (by default that '
        'stops, naming them)')
    args = parser.parse_args(argv)
    files = [('config', args.config), ('image', args.image)]
    if '://' not in args.checkpoint:
        files.append(('checkpoint', args.checkpoint))
    for flag, path in files:
        if not osp.isfile(path):
            parser.error(f'{flag} file {path} does not exist')
    if not args.out.lower().endswith('.png'):
        parser.error(f'--out must name a .png file, got {args.out}')
    return args


def read_image(path: str) -> np.ndarray:
    """Decode an image as BGR, exiting with a message that names it if that fails."""
    try:
        image = mmcv.imread(path)
    except Exception as err:
        image = None
        reason = f' ({err})'
    else:
        reason = ''
    if image is None:
        sys.exit(f'error: cannot decode image {path}: the file is corrupt or not an image'
                 f'{reason}')
    return image


def predict_and_draw(cfg: Config, checkpoint: str, image: np.ndarray, out_file: str,
                     score_thr: float, opacity: float, device: str,
                     allow_partial: bool = False) -> None:
    """Run the model on ``image`` (BGR) and write the drawing to ``out_file``."""
    scope = cfg.get('default_scope')
    rgb = mmcv.bgr2rgb(image)
    if scope == 'mmdet':
        from mmdet.apis import inference_detector
        model = init_model(cfg, checkpoint, device, allow_partial)
        prediction = inference_detector(model, image)
        draw_args = dict(pred_score_thr=score_thr)
    elif scope == 'mmseg':
        from mmseg.apis import inference_model
        model = init_model(cfg, checkpoint, device, allow_partial)
        prediction = inference_model(model, image)
        draw_args = dict(with_labels=False)
        cfg.visualizer.alpha = opacity
    else:
        sys.exit(f'error: {cfg.filename}: default_scope is {scope!r}; this tool handles '
                 'mmdet detectors and mmseg segmentors')
    visualizer = VISUALIZERS.build(cfg.visualizer)
    visualizer.dataset_meta = model.dataset_meta
    visualizer.add_datasample(
        osp.basename(out_file), rgb, data_sample=prediction, draw_gt=False, show=False,
        out_file=out_file, **draw_args)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    image = read_image(args.image)
    cfg = Config.fromfile(args.config)
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    try:
        predict_and_draw(cfg, args.checkpoint, image, args.out, args.score_thr, args.opacity,
                         args.device, args.allow_partial_checkpoint)
    except WeightsMismatchError as err:
        sys.exit(f'error: {err}')
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
