# Copyright (c) mmsparsevit contributors. All rights reserved.
r"""Eager against ``torch.compile`` for each backbone: forward and training step.

For every backbone (a preset of :mod:`measure.presets`) and mode this script builds the
backbone twice with the same weights, compiles the second copy (``torch.compile(model,
backend=...)``, inductor by default) and

* reports the compile time: the first call of the compiled copy (compilation plus one step)
  minus the median of its later steps;
* in inference mode, checks that both give the same outputs (largest difference relative to
  the largest output magnitude);
* times both in one process, in turns (one step of each per round, the order alternating;
  :func:`measure.benchmark.time_in_turns`), and reports the median step of each and the
  median and quartiles of the per-round ratios eager / compiled (the speed-up), which a drift
  of the machine's speed between rounds does not move.

Modes: ``inference`` is a forward pass without autograd in eval mode; ``train`` is a training
step in train mode: forward, backward of the sum of the outputs and an SGD step (the
optimizer runs eagerly on both sides; only the model is compiled, as ``torch.compile(model)``
does). Drop path is off in both, so that both sides compute the same thing.

Example::

    python tools/analysis_tools/benchmark_compile.py --backbones vvt-t lit-ti \
        --size 224 --batch 1 --threads 2 --rounds 8
"""
import argparse
import copy
import json
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from measure.benchmark import add_turn_arguments, time_in_turns
from measure.model_builder import build_model, parse_backbone_spec, sum_outputs
from measure.presets import BACKBONE_PRESETS

MODES = ('inference', 'train')
DEFAULT_BACKBONES = ('vvt-t', 'lit-ti', 'kvt-swin-t', 'kvt-pvtv2-b2')


def build_backbone(name: str) -> nn.Module:
    """The preset ``name`` without drop path (the wrapped backbone's, for KVT), seeded."""
    model_cfg, scope = parse_backbone_spec(name)
    inner = model_cfg.backbone if 'backbone' in model_cfg else model_cfg
    inner.drop_path_rate = 0.
    torch.manual_seed(0)
    return build_model(model_cfg, scope)


def make_step(model: nn.Module, mode: str, images: torch.Tensor,
              clock: Callable[[], float]) -> Callable[[], float]:
    """One timed step (seconds by ``clock``) of ``model`` (eager or compiled) in ``mode``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4) if mode == 'train' else None

    def step() -> float:
        start = clock()
        if optimizer is None:
            with torch.no_grad():
                model(images)
        else:
            optimizer.zero_grad(set_to_none=True)
            sum_outputs(model(images)).backward()
            optimizer.step()
        return clock() - start

    return step


def max_relative_difference(compiled: nn.Module, eager: nn.Module,
                            images: torch.Tensor) -> float:
    """Largest |compiled - eager| over the outputs, relative to the largest |eager|."""
    with torch.no_grad():
        pairs = list(zip(compiled(images), eager(images)))
    return max(((ours - reference).abs().max() / reference.abs().max()).item()
               for ours, reference in pairs)


def measure(name: str, mode: str, args: argparse.Namespace) -> Dict:
    """One result row: compile time, difference, median steps and speed-up."""
    clock = time.process_time if args.timer == 'cpu' else time.perf_counter
    eager = build_backbone(name)
    compiled_copy = copy.deepcopy(eager)
    for model in (eager, compiled_copy):
        model.train(mode == 'train')
    torch._dynamo.reset()
    compiled = torch.compile(compiled_copy, backend=args.backend)
    images = torch.randn(args.batch, 3, args.size, args.size,
                         generator=torch.Generator().manual_seed(0))
    steps = [make_step(eager, mode, images, clock), make_step(compiled, mode, images, clock)]
    first_call_s = steps[1]()
    difference = max_relative_difference(compiled, eager, images) if mode == 'inference' \
        else None
    times = [seconds[args.warmup:] for seconds in time_in_turns(steps, args.warmup + args.rounds)]
    ratios = [eager_s / compiled_s for eager_s, compiled_s in zip(*times)]
    lower, _, upper = statistics.quantiles(ratios, n=4, method='inclusive') \
        if len(ratios) > 1 else (ratios[0], None, ratios[0])
    compiled_ms = 1000 * statistics.median(times[1])
    return dict(
        backbone=name, mode=mode, eager_ms=1000 * statistics.median(times[0]),
        compiled_ms=compiled_ms, compile_s=first_call_s - compiled_ms / 1000,
        speedup=statistics.median(ratios), speedup_q1=lower, speedup_q3=upper,
        max_relative_difference=difference)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--backbones', nargs='+', default=list(DEFAULT_BACKBONES),
                        choices=sorted(BACKBONE_PRESETS), metavar='PRESET',
                        help=f'presets of measure.presets (default: {DEFAULT_BACKBONES})')
    parser.add_argument('--modes', nargs='+', default=list(MODES), choices=MODES)
    parser.add_argument('--backend', default='inductor', help='torch.compile backend')
    parser.add_argument('--size', type=int, default=224, help='square input side')
    parser.add_argument('--batch', type=int, default=1)
    add_turn_arguments(parser, rounds=8)
    parser.add_argument('--out-json', help='write the rows and the environment as JSON')
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error('need --rounds >= 1 and --warmup >= 0')
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(name, mode, args) for name in args.backbones for mode in args.modes]
    print(f'{args.size}x{args.size}, batch {args.batch}, {args.threads} threads, '
          f'{args.timer} clock, backend {args.backend}, {args.rounds} rounds '
          f'(+{args.warmup} warm-up), torch {torch.__version__}')
    print('| backbone | mode | eager ms | compiled ms | eager / compiled (median of per-round '
          'ratios, quartiles) | compile s | max relative diff |')
    print('|---|---|---|---|---|---|---|')
    for row in rows:
        difference = row['max_relative_difference']
        print(f'| {row["backbone"]} | {row["mode"]} | {row["eager_ms"]:.1f} | '
              f'{row["compiled_ms"]:.1f} | {row["speedup"]:.2f} ({row["speedup_q1"]:.2f}-'
              f'{row["speedup_q3"]:.2f}) | {row["compile_s"]:.0f} | '
              f'{"" if difference is None else f"{difference:.1e}"} |')
    if args.out_json:
        environment = dict(vars(args), torch=torch.__version__,
                           cpu=platform.processor() or platform.machine())
        with open(args.out_json, 'w') as file:
            json.dump(dict(environment=environment, rows=rows), file, indent=2)
    return rows


if __name__ == '__main__':
    main()
