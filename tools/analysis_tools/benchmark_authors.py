r"""VVT-S and LIT-S against the authors' own code, timed side by side in one process.

The authors' models are imported from checkouts of their repositories that you make
(nothing of their code ships with this project; see :mod:`measure.authors` for what is
imported and the stand-ins their LIT file needs)::

    git clone https://github.com/OpenNLPLab/Vicinity-Vision-Transformer ../vvt-authors
    git clone https://github.com/zhuang-group/LIT ../lit-authors
    python tools/analysis_tools/benchmark_authors.py --threads 2 \
        --repo vvt-s=../vvt-authors --repo lit-s-coco=../lit-authors \
        --sizes 512 1024 --modes inference train --rounds-at 1024:3

For each backbone both models get the same weights (the plain transcription's, in the
official layout; ours through our converter) and are first checked to compute the same
function (largest relative difference of the four stage maps, float64, 224²). Then every
(mode, size) runs in a fresh process holding both, timed pass by pass in turns, the order
alternating (``measure_interleaved``); the verdict is the median of the per-round time ratios
ours / authors' against the target of issue #17 (``--min-speedup``, 1.5x), with quartiles.
Training = forward + backward of the sum of the outputs, batch 1.

Writes ``authors.md`` (the table quoted in docs/model_zoo.md) and ``authors.json`` under
``--out-dir``.
"""
import argparse
import json
import os
import platform
from typing import Dict, List, Optional, Sequence

import torch

from measure.authors import AUTHORS_FILES, authors_file, build_authors_model
from measure.benchmark import (AUTHORS, BenchmarkCase, add_turn_arguments, paired_time_ratio,
                               run_interleaved_in_subprocess)
from measure.pairs import build_pair

MODES = ('inference', 'train')


def parse_int_map(items: Sequence[str], option: str) -> Dict[int, int]:
    result = {}
    for item in items:
        key, _, value = item.partition(':')
        if not (key.isdigit() and value.isdigit()):
            raise argparse.ArgumentTypeError(f'{option} takes SIZE:ROUNDS, got {item!r}')
        result[int(key)] = int(value)
    return result


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--repo', action='append', default=[], metavar='NAME=PATH', required=True,
        help=f'checkout of the authors\' repository for a backbone ({", ".join(AUTHORS_FILES)})'
        '; repeat for each')
    parser.add_argument('--sizes', type=int, nargs='+', default=[512, 1024],
                        help='square input sides')
    parser.add_argument('--modes', nargs='+', choices=MODES, default=list(MODES))
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--min-speedup', type=float, default=1.5,
                        help='the target: ours at least this many times faster')
    parser.add_argument('--rounds-at', nargs='*', default=[], metavar='SIZE:ROUNDS',
                        help='fewer (or more) timed rounds at a size')
    parser.add_argument('--out-dir', default='work_dirs/benchmark_authors')
    add_turn_arguments(parser, rounds=6)
    args = parser.parse_args(argv)
    args.repos = {}
    for item in args.repo:
        name, _, path = item.partition('=')
        if name not in AUTHORS_FILES or not path:
            parser.error(f'--repo takes NAME=PATH with NAME one of {", ".join(AUTHORS_FILES)},'
                         f' got {item!r}')
        try:
            authors_file(name, path)
        except FileNotFoundError as error:
            parser.error(str(error))
        args.repos[name] = os.path.abspath(path)
    try:
        args.rounds_at = parse_int_map(args.rounds_at, '--rounds-at')
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    return args


def same_function_error(name: str, repo: str) -> float:
    """Largest relative difference of the stage maps, ours vs the authors', float64, 224²."""
    torch.manual_seed(0)
    ours, plain = build_pair(name)
    authors = build_authors_model(name, repo, plain.state_dict())
    images = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        return max(((a - b).abs().max() / b.abs().max()).item()
                   for a, b in zip(ours.double()(images), authors.double()(images)))


def case(args: argparse.Namespace, name: str, mode: str, size: int,
         implementation: str) -> BenchmarkCase:
    return BenchmarkCase(
        shape=(size, size),
        batch_size=1,
        mode=mode,
        backbone=name,
        implementation=implementation,
        authors_repo=args.repos[name] if implementation == AUTHORS else None,
        device=args.device,
        warmup=args.warmup,
        repeats=args.rounds_at.get(size, args.rounds),
        threads=args.threads,
        label=f'{name} ({implementation})',
        timer=args.timer)


def measure_backbone(args: argparse.Namespace, name: str) -> List[Dict]:
    error = same_function_error(name, args.repos[name])
    print(f'{name}: ours vs the authors\' code, max relative difference {error:.1e}',
          flush=True)
    results = []
    for mode in args.modes:
        for size in args.sizes:
            cases = [case(args, name, mode, size, impl) for impl in ('ours', AUTHORS)]
            print(f'  {cases[0].describe()} and {cases[1].label}, interleaved', flush=True)
            ours, authors = run_interleaved_in_subprocess(cases)
            for row in (ours, authors):
                if row.get('error'):
                    raise RuntimeError(f'{row["label"]} {mode} {size}² failed: {row["error"]}')
            ratio, lower, upper = paired_time_ratio(ours, authors)
            results.append(
                dict(
                    backbone=name,
                    mode=mode,
                    size=size,
                    ours_ms=ours['median_ms'],
                    authors_ms=authors['median_ms'],
                    time_ratio=ratio,
                    time_ratio_quartiles=[lower, upper],
                    speedup=1 / ratio,
                    rounds=cases[0].repeats,
                    ours_extra_mem_mb=ours['extra_mem_mb'],
                    authors_extra_mem_mb=authors['extra_mem_mb'],
                    max_relative_difference=error,
                    met=ratio <= 1 / args.min_speedup))
            print(f'    {ours["median_ms"]:.0f} vs {authors["median_ms"]:.0f} ms, ratio '
                  f'{ratio:.2f} ({lower:.2f}-{upper:.2f}): {1 / ratio:.2f}x', flush=True)
    return results


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    results = [row for name in args.repos for row in measure_backbone(args, name)]
    lines = [
        f'Measured by `benchmark_authors.py` on {os.cpu_count()} CPUs '
        f'({platform.processor() or platform.machine()}), torch {torch.__version__}, '
        f'{args.threads} thread(s), {args.timer} clock, load average {load:.1f} at the start.',
        '', '| backbone | mode | input | ours | authors\' code | paired ratio (quartiles) | '
        f'>= {args.min_speedup:g}x? |', '|---|---|---|---|---|---|---|'
    ]
    lines += [
        f'| {row["backbone"]} | {row["mode"]} | {row["size"]}² | {row["ours_ms"]:.0f} ms | '
        f'{row["authors_ms"]:.0f} ms | {row["time_ratio"]:.2f} '
        f'({row["time_ratio_quartiles"][0]:.2f}–{row["time_ratio_quartiles"][1]:.2f}, '
        f'{row["rounds"]} rounds): **{row["speedup"]:.2f}x** | '
        f'{"yes" if row["met"] else "**no**"} |' for row in results
    ]
    table = '\n'.join(lines) + '\n'
    with open(os.path.join(args.out_dir, 'authors.md'), 'w') as file:
        file.write(table)
    with open(os.path.join(args.out_dir, 'authors.json'), 'w') as file:
        json.dump(dict(threads=args.threads, timer=args.timer, torch=torch.__version__,
                       results=results), file, indent=2)
    print('\n' + table, flush=True)
    return results


if __name__ == '__main__':
    main()
