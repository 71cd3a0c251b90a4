# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Draw a trained model's results: a gallery of test images and the run's training curve.

- ``gallery.png``: the first ``--num-images`` images of the config's test split, upscaled to
  ``--size`` pixels, each as ground truth | prediction (detectors: boxes with class names, and
  scores on the prediction; segmentors: the class colours blended into the image).
- ``training_curve.png`` (with ``--work-dir``, the training run's folder): the training loss
  and every validation metric logged by mmengine (``vis_data/scalars.json``) over iterations.

Example:
    python tools/analysis_tools/visualize_results.py CONFIG CHECKPOINT \
        --work-dir work_dirs/demo-det --out-dir work_dirs/demo-det/pictures
"""
import argparse
import glob
import json
import math
import os
import os.path as osp
import shutil
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib
import mmcv
import numpy as np
from mmengine.config import Config, DictAction
from mmengine.dataset import pseudo_collate
from mmengine.registry import DATASETS, VISUALIZERS, init_default_scope
from mmengine.structures import PixelData

import mmsparsevit.models  # noqa: F401  registers this package's modules
from mmsparsevit.apis.inference import init_model
from mmsparsevit.engine import WeightsMismatchError

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Draw a gallery of predictions and the '
                                     'training curve of a run')
    parser.add_argument('config', help='config file of the model')
    parser.add_argument('checkpoint', help='checkpoint file (path or URL)')
    parser.add_argument('--out-dir', required=True, help='folder for the PNG files')
    parser.add_argument('--work-dir', help='training run folder: also draw its curve')
    parser.add_argument('--num-images', type=int, default=8, help='images in the gallery')
    parser.add_argument('--size', type=int, default=320,
                        help='each image is upscaled to about this many pixels on its long '
                        'side before drawing, so that labels are legible')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='draw predicted boxes scoring at least this (detection)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, e.g. test_dataloader.dataset.data_root')
    return parser.parse_args(argv)


def _upscaled(data_sample, factor: int):
    """A copy of ``data_sample`` with its boxes, masks and maps ``factor`` times larger."""
    sample = data_sample.clone()
    for name in ('gt_instances', 'pred_instances'):
        if name in sample and 'bboxes' in sample.get(name):
            sample.get(name).bboxes = sample.get(name).bboxes * factor
    for name in ('gt_sem_seg', 'pred_sem_seg'):
        if name in sample:
            data = sample.get(name).data
            setattr(sample, name, PixelData(
                data=data.repeat_interleave(factor, 1).repeat_interleave(factor, 2)))
    return sample


def draw_gallery(cfg: Config, checkpoint: str, out_file: str, num_images: int, size: int,
                 score_thr: float) -> int:
    """Write the gallery of the first ``num_images`` test images; return how many it has."""
    model = init_model(cfg, checkpoint)
    init_default_scope(cfg.default_scope)
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    visualizer = VISUALIZERS.build(cfg.visualizer)
    visualizer.dataset_meta = dataset.metainfo
    detection = cfg.default_scope == 'mmdet'
    tiles = []
    scratch = tempfile.mkdtemp()
    for index in range(min(num_images, len(dataset))):
        prediction = model.test_step(pseudo_collate([dataset[index]]))[0]
        image = mmcv.imread(prediction.img_path, channel_order='rgb')
        factor = max(1, math.ceil(size / max(image.shape[:2])))
        image = mmcv.imrescale(image, factor, interpolation='nearest')
        draw_args = dict(pred_score_thr=score_thr) if detection else dict(with_labels=False)
        # Read back from a file: mmseg's visualizer keeps only the prediction panel in memory.
        tile_file = osp.join(scratch, f'{index}.png')
        visualizer.add_datasample(osp.basename(prediction.img_path), image,
                                  data_sample=_upscaled(prediction, factor), draw_gt=True,
                                  draw_pred=True, show=False, out_file=tile_file, **draw_args)
        tiles.append(mmcv.imread(tile_file, channel_order='rgb'))
    shutil.rmtree(scratch)
    if not tiles:
        raise ValueError('the test split has no images')
    columns = 2 if len(tiles) > 1 else 1
    height = max(tile.shape[0] for tile in tiles)
    width = max(tile.shape[1] for tile in tiles)
    grid = np.full((math.ceil(len(tiles) / columns) * height, columns * width, 3), 255, np.uint8)
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        grid[row * height:row * height + tile.shape[0],
             column * width:column * width + tile.shape[1]] = tile
    mmcv.imwrite(mmcv.rgb2bgr(grid), out_file, auto_mkdir=True)
    return len(tiles)


def read_scalars(work_dir: str) -> Tuple[List[Tuple[int, float]], Dict[str, List]]:
    """Training losses and validation metrics, each as (iteration, value), from the newest
    ``vis_data/scalars.json`` of a run folder (a metric at the training iteration after which
    it was validated)."""
    # mmengine names each run's folder by its start time, so the last in order is the newest.
    logs = sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')))
    if not logs:
        raise FileNotFoundError(f'no */vis_data/scalars.json under {work_dir}: is it the '
                                'folder of a training run?')
    losses, metrics, iteration = [], {}, 0
    with open(logs[-1], encoding='utf-8') as file:
        for line in file:
            record = json.loads(line)
            if 'loss' in record:
                iteration = record['step']
                losses.append((iteration, record['loss']))
                continue
            # mmengine logs a validation with its epoch as the step (0 in iteration-based
            # runs); it ran after the last training iteration logged before it.
            for key, value in record.items():
                if '/' in key or key in ('mIoU', 'aAcc', 'mAcc'):
                    metrics.setdefault(key, []).append((iteration, value))
    return losses, metrics


def draw_training_curve(work_dir: str, out_file: str, metric_keys: Sequence[str]) -> None:
    """Plot the loss (left axis) and the validation metrics named in ``metric_keys`` (right
    axis) against the iteration."""
    losses, metrics = read_scalars(work_dir)
    figure, loss_axis = plt.subplots(figsize=(7, 4), dpi=120)
    loss_axis.plot(*zip(*losses), color='tab:blue', linewidth=1, label='training loss')
    loss_axis.set_xlabel('iteration')
    loss_axis.set_ylabel('loss', color='tab:blue')
    shown = [key for key in metric_keys if key in metrics]
    if shown:
        metric_axis = loss_axis.twinx()
        for key in shown:
            metric_axis.plot(*zip(*metrics[key]), marker='o', label=key)
        metric_axis.set_ylabel('validation metric')
        metric_axis.legend(loc='center right')
    loss_axis.set_title(osp.basename(osp.normpath(work_dir)))
    loss_axis.grid(alpha=0.3)
    figure.tight_layout()
    os.makedirs(osp.dirname(osp.abspath(out_file)), exist_ok=True)
    figure.savefig(out_file)
    plt.close(figure)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    gallery = osp.join(args.out_dir, 'gallery.png')
    try:
        count = draw_gallery(cfg, args.checkpoint, gallery, args.num_images, args.size,
                             args.score_thr)
    except WeightsMismatchError as err:
        sys.exit(f'error: {err}')
    print(f'wrote {gallery} ({count} test images, ground truth | prediction)')
    if args.work_dir:
        curve = osp.join(args.out_dir, 'training_curve.png')
        keys = ('coco/bbox_mAP', 'coco/bbox_mAP_50') if cfg.default_scope == 'mmdet' else (
            'mIoU', )
        draw_training_curve(args.work_dir, curve, keys)
        print(f'wrote {curve}')


if __name__ == '__main__':
    main()
