# Copyright (c) mmsparsevit contributors. All rights reserved.
"""The main job: generate the demo data, train from scratch, evaluate, draw a prediction.

Each step runs the same command a user would type (printed before it runs):
``make_demo_data.py``, ``train.py``, ``test.py`` on the held-out split and
``analysis_tools/visualize_results.py`` (a gallery of held-out predictions beside their
ground truth, and the training curve). The job ends by printing the metric and where the
pictures are, and fails (exit code 1) if the model has not learned (metric below
``--expect``).

Examples:
    python tools/run_demo.py det      # detection: bbox mAP (COCO metric)
    python tools/run_demo.py seg      # semantic segmentation: mIoU
"""
import argparse
import glob
import json
import os.path as osp
import shlex
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

# task -> config, dataset, metric key, metric scale (1 = fraction), bar.
TASKS = dict(
    det=dict(
        config='configs/demo/retinanet_vvt-demo_fpn_shapes-coco.py',
        dataset='coco',
        metric='coco/bbox_mAP',
        scale=1.0,
        expect=0.3),
    seg=dict(
        config='configs/demo/fpn_vvt-demo_shapes-ade20k.py',
        dataset='ade',
        metric='mIoU',
        scale=100.0,
        expect=0.6))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train and evaluate a demo model end to end')
    parser.add_argument('task', choices=tuple(TASKS), help='det (bbox mAP) or seg (mIoU)')
    parser.add_argument('--work-dir', help='defaults to work_dirs/demo-<task>')
    parser.add_argument('--expect', type=float,
                        help='fail if the metric (as a fraction) ends below this '
                        '(default: 0.3 bbox mAP, 0.6 mIoU)')
    parser.add_argument('--cfg-options', nargs='+', default=[],
                        help='passed on to train.py and test.py')
    return parser.parse_args(argv)


def run(command: List[str]) -> None:
    print(f'\n$ {shlex.join(command)}', flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def read_test_metrics(work_dir: str) -> Dict[str, float]:
    """The metrics of the newest test run logged under ``work_dir`` (mmengine's json log)."""
    logs = sorted(glob.glob(osp.join(work_dir, '*', '*.json')), key=osp.getmtime)
    if not logs:
        raise FileNotFoundError(f'no test log (*/*.json) under {work_dir}')
    with open(logs[-1], encoding='utf-8') as f:
        return json.loads(f.read().strip().splitlines()[-1])


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    task = TASKS[args.task]
    work_dir = args.work_dir or osp.join('work_dirs', f'demo-{args.task}')
    expect = task['expect'] if args.expect is None else args.expect
    python = sys.executable
    options = ['--cfg-options', *args.cfg_options] if args.cfg_options else []
    started = time.time()
    run([python, 'tools/dataset_converters/make_demo_data.py', '--dataset', task['dataset']])
    run([python, 'tools/train.py', task['config'], '--work-dir', work_dir, *options])
    trained = time.time()
    with open(osp.join(ROOT, work_dir, 'last_checkpoint'), encoding='utf-8') as f:
        checkpoint = f.read().strip()
    test_dir = osp.join(work_dir, 'test')
    run([python, 'tools/test.py', task['config'], checkpoint, '--work-dir', test_dir, *options])
    pictures = osp.join(work_dir, 'pictures')
    run([python, 'tools/analysis_tools/visualize_results.py', task['config'], checkpoint,
         '--work-dir', work_dir, '--out-dir', pictures, *options])
    score = read_test_metrics(osp.join(ROOT, test_dir))[task['metric']] / task['scale']
    print(f'\n{args.task} demo: {task["metric"]} = {score:.3f} on the held-out split '
          f'(training {trained - started:.0f} s including data generation, '
          f'total {time.time() - started:.0f} s)\n'
          f'pictures: {osp.join(pictures, "gallery.png")} (8 held-out images, ground truth | '
          f'prediction) and {osp.join(pictures, "training_curve.png")}')
    if score < expect:
        sys.exit(f'error: {task["metric"]} {score:.3f} is below the expected {expect}')


if __name__ == '__main__':
    main()
