r"""Latency, images/s and peak memory of a backbone or detector/segmentor.

Every (model, resolution, batch size, mode) case runs in a fresh process: warm-up
passes, then timed passes; the median is reported (with min/mean/max). Several configs or
backbone presets can be given at once; one table and one CSV/JSON cover them all.

Peak memory: on CPU the process's resident-set high-water mark during the passes (reset with
/proc/self/clear_refs after the model is built), on CUDA ``max_memory_allocated``; see
measure/benchmark.py.

Examples::

    python tools/analysis_tools/benchmark.py --backbone vvt-s --shape 224 512 --threads 2
    python tools/analysis_tools/benchmark.py --backbone vvt-t vvt-s swin-t --shape 224 \
        --threads 1 --timer cpu --out work_dirs/bench/backbones
    python tools/analysis_tools/benchmark.py configs/retinanet/*.py --shape 800x1280 --threads 1 \
        --timer cpu --warmup 1 --repeats 2 --out work_dirs/bench/retinanet
    python tools/analysis_tools/benchmark.py configs/fpn/fpn_vvt-s_4xb4-80k_ade20k-512x512.py \
        --shape 512 --modes inference train --batch-sizes 1 2 --out work_dirs/bench/fpn
"""
import argparse
import csv
import json
import os

from mmengine.config import DictAction

from measure import BACKBONE_PRESETS
from measure.benchmark import MODES, TIMERS, BenchmarkCase, run_case_in_subprocess

COLUMNS = ('label', 'mode', 'device', 'batch_size', 'height', 'width', 'threads', 'timer',
           'params',
           'median_ms', 'min_ms', 'mean_ms', 'max_ms', 'images_per_s', 'peak_mem_mb',
           'extra_mem_mb', 'mem_method', 'warmup', 'repeats', 'config', 'backbone',
           'backbone_only', 'error')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Benchmark latency and memory of a model.')
    parser.add_argument(
        'configs', nargs='*', metavar='CONFIG', help='config files (mmdet, mmseg or backbone)')
    parser.add_argument(
        '--backbone',
        nargs='+',
        default=[],
        help=f'presets ({", ".join(BACKBONE_PRESETS)}) or dict literals')
    parser.add_argument('--backbone-only', action='store_true')
    parser.add_argument(
        '--shape',
        nargs='+',
        default=['224'],
        help='input sizes, each "S" (square) or "HxW", e.g. 224 512 800x1280')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1])
    parser.add_argument('--modes', nargs='+', choices=MODES, default=['inference'])
    parser.add_argument('--device', default='cpu', help='cpu, cuda or cuda:N')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, help='torch CPU threads (default: torch)')
    parser.add_argument(
        '--timer',
        choices=TIMERS,
        default='wall',
        help='wall clock, or process CPU time (CPU with --threads 1: robust on a shared '
        'machine)')
    parser.add_argument('--timeout', type=float, help='seconds allowed per case')
    parser.add_argument('--label', help='name of the model in the results (one model only)')
    parser.add_argument('--out', help='write OUT.csv and OUT.json')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={})
    args = parser.parse_args(argv)
    if not args.configs and not args.backbone:
        parser.error('give config files and/or --backbone specs')
    if args.label and len(args.configs) + len(args.backbone) > 1:
        parser.error('--label names one model; give a single config or --backbone')
    args.shape = [parse_size(text, parser) for text in args.shape]
    return args


def parse_size(text, parser):
    try:
        sizes = [int(part) for part in text.lower().split('x')]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) <= 0:
        parser.error(f'--shape entries are "S" or "HxW" with positive sizes, got {text!r}')
    return tuple(sizes) * (2 // len(sizes))


def write_results(rows, out):
    directory = os.path.dirname(out)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(out + '.json', 'w') as file:
        json.dump(rows, file, indent=2)
    with open(out + '.csv', 'w', newline='') as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS, extrasaction='ignore')
        writer.writeheader()
        writer.writerows(rows)


def format_row(row):
    if row.get('error'):
        return f'FAILED: {row["error"]}'
    return (f'{row["median_ms"]:.1f} ms median (min {row["min_ms"]:.1f}, max '
            f'{row["max_ms"]:.1f}), {row["images_per_s"]:.2f} img/s, peak '
            f'{row["peak_mem_mb"]:.0f} MiB (+{row["extra_mem_mb"]:.0f} MiB)')


def main(argv=None):
    args = parse_args(argv)
    sources = [dict(config=config) for config in args.configs]
    sources += [dict(backbone=backbone) for backbone in args.backbone]
    cases = [
        BenchmarkCase(
            shape=shape,
            batch_size=batch_size,
            mode=mode,
            backbone_only=args.backbone_only,
            device=args.device,
            warmup=args.warmup,
            repeats=args.repeats,
            threads=args.threads,
            cfg_options=args.cfg_options,
            label=args.label,
            timer=args.timer,
            **source) for source in sources for mode in args.modes for shape in args.shape
        for batch_size in args.batch_sizes
    ]
    rows = []
    for index, case in enumerate(cases, 1):
        print(f'[{index}/{len(cases)}] {case.describe()}', flush=True)
        rows.append(run_case_in_subprocess(case, args.timeout))
        print(f'[{index}/{len(cases)}] {case.describe()}: {format_row(rows[-1])}', flush=True)
        if args.out:
            write_results(rows, args.out)
    print('\n| model | mode | input | batch | median ms | images/s | peak MiB | extra MiB |')
    print('|---|---|---|---|---|---|---|---|')
    for row in rows:
        if row.get('error'):
            print(f'| {row["label"]} | {row["mode"]} | {row["height"]}x{row["width"]} | '
                  f'{row["batch_size"]} | failed: {row["error"]} | | | |')
            continue
        print(f'| {row["label"]} | {row["mode"]} | {row["height"]}x{row["width"]} | '
              f'{row["batch_size"]} | {row["median_ms"]:.1f} | {row["images_per_s"]:.2f} | '
              f'{row["peak_mem_mb"]:.0f} | {row["extra_mem_mb"]:.0f} |')
    if args.out:
        print(f'results: {args.out}.csv, {args.out}.json')
    return rows


if __name__ == '__main__':
    main()
