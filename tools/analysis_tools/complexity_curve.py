r"""Cost versus input resolution for VVT, LIT, KVT and their baselines.

Sweeps square inputs (224² to 1536² by default) and writes, under --out-dir:

* ``flops.csv`` and ``flops.png``: parameters and GFLOPs (counted exactly, shape-only
  pass; seconds per model), absolute and relative to 224²;
* unless ``--flops-only``: ``measured.csv``, ``latency.png`` and ``memory.png``: inference
  latency (median of ``--repeats``) and peak extra memory, one fresh process per case
  (see tools/analysis_tools/benchmark.py). A model's larger inputs are skipped once one of
  its cases takes longer than ``--max-seconds`` per pass, which keeps CPU sweeps bounded.

Example::

    python tools/analysis_tools/complexity_curve.py --flops-only --out-dir work_dirs/curve
    python tools/analysis_tools/complexity_curve.py --sizes 224 384 512 768 1024 \
        --threads 2 --repeats 3 --out-dir work_dirs/curve
"""
import argparse
import csv
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from measure import (BACKBONE_PRESETS, CURVE_PRESETS, build_model, load_model_spec,  # noqa: E402
                     measure_complexity)
from measure.benchmark import TIMERS, BenchmarkCase, run_case_in_subprocess  # noqa: E402

DEFAULT_SIZES = (224, 384, 512, 768, 1024, 1280, 1536)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='FLOPs / latency / memory vs resolution.')
    parser.add_argument(
        '--models',
        nargs='+',
        default=list(CURVE_PRESETS),
        help=f'backbone presets ({", ".join(BACKBONE_PRESETS)}) or dict literals')
    parser.add_argument('--sizes', type=int, nargs='+', default=list(DEFAULT_SIZES))
    parser.add_argument('--flops-only', action='store_true', help='skip latency and memory')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, help='torch CPU threads (default: torch)')
    parser.add_argument(
        '--timer',
        choices=TIMERS,
        default='wall',
        help='wall clock, or process CPU time (CPU with --threads 1)')
    parser.add_argument(
        '--max-seconds',
        type=float,
        default=20.0,
        help='skip a model\'s larger sizes once one pass takes longer than this')
    parser.add_argument('--timeout', type=float, default=900, help='seconds per measured case')
    parser.add_argument('--out-dir', default='work_dirs/complexity_curve')
    args = parser.parse_args(argv)
    if min(args.sizes) <= 0:
        parser.error(f'--sizes must be positive, got {args.sizes}')
    args.sizes = sorted(set(args.sizes))
    return args


def sweep_flops(models, sizes):
    rows = []
    for name in models:
        model_cfg, scope = load_model_spec(backbone=name)
        model = build_model(model_cfg, scope)
        base = None
        for size in sizes:
            result = measure_complexity(model, (size, size))
            base = base or result.flops
            rows.append(
                dict(
                    model=name,
                    size=size,
                    params=result.params,
                    gflops=result.flops / 1e9,
                    relative_to_smallest=result.flops / base))
            print(f'{name:<14} {size:>5}²  {result.flops / 1e9:9.2f} GFLOPs', flush=True)
    return rows


def sweep_measured(models, sizes, args):
    rows = []
    cases = len(models) * len(sizes)
    index = 0
    for name in models:
        too_slow = False
        for size in sizes:
            index += 1
            if too_slow:
                print(f'[{index}/{cases}] {name} {size}² skipped (previous size slower than '
                      f'{args.max_seconds} s)', flush=True)
                continue
            case = BenchmarkCase(
                shape=(size, size),
                batch_size=args.batch_size,
                mode='inference',
                backbone=name,
                device=args.device,
                warmup=args.warmup,
                repeats=args.repeats,
                threads=args.threads,
                label=name,
                timer=args.timer)
            print(f'[{index}/{cases}] {case.describe()}', flush=True)
            row = run_case_in_subprocess(case, args.timeout)
            rows.append(dict(row, model=name, size=size))
            if row.get('error'):
                print(f'  failed: {row["error"]}', flush=True)
                too_slow = True
                continue
            print(f'  {row["median_ms"]:.1f} ms, peak +{row["extra_mem_mb"]:.0f} MiB',
                  flush=True)
            too_slow = row['median_ms'] / 1000 > args.max_seconds
    return rows


def write_csv(rows, path):
    columns = list(rows[0])
    for row in rows:
        columns += [key for key in row if key not in columns]
    with open(path, 'w', newline='') as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows, key, ylabel, title, path, log_y=True):
    figure, axis = plt.subplots(figsize=(7, 5))
    for name in dict.fromkeys(row['model'] for row in rows):
        points = [(row['size'], row[key]) for row in rows
                  if row['model'] == name and row.get(key) not in (None, '')]
        if points:
            sizes, values = zip(*points)
            axis.plot(sizes, values, marker='o', label=name)
    axis.set_xlabel('input resolution (square side, pixels)')
    axis.set_ylabel(ylabel)
    if log_y:
        axis.set_yscale('log')
    axis.set_title(title)
    axis.grid(True, which='both', alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    flop_rows = sweep_flops(args.models, args.sizes)
    write_csv(flop_rows, os.path.join(args.out_dir, 'flops.csv'))
    plot(flop_rows, 'gflops', 'GFLOPs (multiply-adds)', 'FLOPs vs input resolution',
         os.path.join(args.out_dir, 'flops.png'))
    plot(flop_rows, 'relative_to_smallest', f'FLOPs / FLOPs at {args.sizes[0]}²',
         'FLOP growth with resolution', os.path.join(args.out_dir, 'flops_relative.png'))
    outputs = ['flops.csv', 'flops.png', 'flops_relative.png']
    if not args.flops_only:
        measured = sweep_measured(args.models, args.sizes, args)
        if measured:
            write_csv(measured, os.path.join(args.out_dir, 'measured.csv'))
            device = f'{args.device}, {measured[0].get("threads", "?")} threads'
            plot(measured, 'median_ms', 'latency, ms (median)',
                 f'Inference latency vs resolution ({device}, batch {args.batch_size})',
                 os.path.join(args.out_dir, 'latency.png'))
            plot(measured, 'extra_mem_mb', 'peak extra memory, MiB',
                 f'Inference peak memory vs resolution ({device})',
                 os.path.join(args.out_dir, 'memory.png'))
            outputs += ['measured.csv', 'latency.png', 'memory.png']
    print('wrote ' + ', '.join(os.path.join(args.out_dir, name) for name in outputs))


if __name__ == '__main__':
    main()
