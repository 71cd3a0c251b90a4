# Copyright (c) mmsparsevit contributors. All rights reserved.
r"""torchvision's ``deform_conv2d`` against mmcv's, at the sizes of LIT's token merging.

Deformable Token Merging (DTM) is a k x k, stride-k deformable convolution with bias. Two
kernels can compute it: ``mmcv.ops.deform_conv2d`` (a pybind call into a compiled mmcv; it
has no bias, so the bias is added after it) and ``torchvision.ops.deform_conv2d`` (a
dispatcher op with a bias, seen by FLOP counters and ``torch.compile``). This script builds a
LIT backbone, records the input of each of its DTMs at the given input size (LIT-S at 512²
by default: 96 -> 192 channels on 128², 192 -> 384 on 64², 384 -> 768 on 32²), then, for
every such size:

* checks that the two compute the same outputs and gradients on random inputs and offsets
  (largest difference relative to the largest value, reported);
* times forward (no grad) and forward + backward of both in one process, in turns (one
  call of each per round, the order alternating; :func:`measure.benchmark.time_in_turns`),
  and reports the median time of each and the median of the per-round ratios
  torchvision / mmcv, which a drift of the machine's speed between rounds does not move.
  The ``all DTMs`` row sums each round over the sizes: one LIT pass's token merging.

Example::

    python tools/analysis_tools/benchmark_deform_conv.py --threads 2 --rounds 10
"""
import argparse
import json
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from mmcv.ops import deform_conv2d as mmcv_deform_conv2d
from torch import Tensor
from torchvision.ops import deform_conv2d as torchvision_deform_conv2d

from measure.benchmark import add_turn_arguments, time_in_turns
from mmsparsevit.models import LIT
from mmsparsevit.models.layers import DeformableTokenMerging

IMPLEMENTATIONS = ('mmcv', 'torchvision')
MODES = ('forward', 'forward+backward')
Operands = Tuple[Tensor, Tensor, Tensor, Tensor]


def dtm_sizes(arch: str, size: int) -> List[Tuple[int, int, int, int]]:
    """``(in_channels, out_channels, height, width)`` of each DTM input of ``LIT(arch)`` on a
    ``size`` x ``size`` image."""
    model = LIT(arch=arch, drop_path_rate=0.).eval()
    sizes = []

    def record(module: DeformableTokenMerging, args: Tuple[Tensor]) -> None:
        sizes.append((module.in_channels, module.out_channels, *args[0].shape[-2:]))

    hooks = [
        module.register_forward_pre_hook(record) for module in model.modules()
        if isinstance(module, DeformableTokenMerging)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return sizes


def make_operands(in_channels: int, out_channels: int, height: int, width: int, kernel: int,
                  batch: int, offset_std: float, dtype: torch.dtype,
                  generator: torch.Generator) -> Operands:
    """Input, offsets, weight and bias of one DTM, all requiring grad."""

    def randn(*shape: int, std: float = 1.0) -> Tensor:
        return (std * torch.randn(*shape, generator=generator, dtype=dtype)).requires_grad_()

    return (randn(batch, in_channels, height, width),
            randn(batch, 2 * kernel * kernel, height // kernel, width // kernel, std=offset_std),
            randn(out_channels, in_channels, kernel, kernel, std=(in_channels * kernel**2)**-0.5),
            randn(out_channels, std=0.1))


def deform_conv(implementation: str, operands: Operands, stride: int) -> Tensor:
    """The deformable convolution with bias, by ``implementation``."""
    x, offset, weight, bias = operands
    if implementation == 'torchvision':
        return torchvision_deform_conv2d(x, offset, weight, bias, stride=stride)
    # mmcv's autograd Function takes positional arguments only: stride, padding, dilation,
    # groups, deform_groups, bias (unsupported), im2col_step.
    out = mmcv_deform_conv2d(x, offset, weight, stride, 0, 1, 1, 1, False, x.shape[0])
    return out + bias.view(1, -1, 1, 1)


def max_differences(operands: Operands, stride: int) -> Dict[str, float]:
    """Largest absolute difference of the outputs and of each gradient, relative to the
    largest magnitude of mmcv's."""
    grad_out = None
    results = []
    for implementation in IMPLEMENTATIONS:
        out = deform_conv(implementation, operands, stride)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, operands, grad_out)
        results.append((out.detach(), ) + grads)
    names = ('output', 'grad_input', 'grad_offset', 'grad_weight', 'grad_bias')
    return {
        name: ((tv - mm).abs().max() / mm.abs().max()).item()
        for name, mm, tv in zip(names, *results)
    }


def make_step(implementation: str, mode: str, operands: Operands, stride: int,
              clock: Callable[[], float]) -> Callable[[], float]:
    """One timed call (seconds by ``clock``) of an implementation in a mode."""

    def step() -> float:
        start = clock()
        if mode == 'forward':
            with torch.no_grad():
                deform_conv(implementation, operands, stride)
        else:
            deform_conv(implementation, operands, stride).sum().backward()
            for tensor in operands:
                tensor.grad = None
        return clock() - start

    return step


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', default='small', help='LIT preset whose DTM sizes are used')
    parser.add_argument('--size', type=int, default=512, help='square input side of LIT')
    parser.add_argument('--batch', type=int, default=1)
    add_turn_arguments(parser, rounds=10)
    parser.add_argument(
        '--offset-std', type=float, default=1.0, help='std of the random offsets (pixels)')
    parser.add_argument('--out-json', help='write the rows and the environment as JSON')
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error('need --rounds >= 1 and --warmup >= 0')
    return args


def summarise(mmcv_times: Sequence[float], torchvision_times: Sequence[float]) -> Dict:
    """Median times (ms) and the median of the per-round ratios torchvision / mmcv."""
    return dict(
        mmcv_ms=1000 * statistics.median(mmcv_times),
        torchvision_ms=1000 * statistics.median(torchvision_times),
        ratio=statistics.median(tv / mm for tv, mm in zip(torchvision_times, mmcv_times)))


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    kernel = DeformableTokenMerging(1, 1).kernel_size
    clock = time.process_time if args.timer == 'cpu' else time.perf_counter
    rows = []
    totals = {mode: [[0.0] * args.rounds for _ in IMPLEMENTATIONS] for mode in MODES}
    for in_channels, out_channels, height, width in dtm_sizes(args.arch, args.size):
        operands = make_operands(in_channels, out_channels, height, width, kernel, args.batch,
                                 args.offset_std, torch.float32, generator)
        differences = max_differences(operands, kernel)
        for mode in MODES:
            steps = [make_step(name, mode, operands, kernel, clock) for name in IMPLEMENTATIONS]
            times = [
                seconds[args.warmup:]
                for seconds in time_in_turns(steps, args.warmup + args.rounds)
            ]
            for total, seconds in zip(totals[mode], times):
                total[:] = [sum(pair) for pair in zip(total, seconds)]
            rows.append(
                dict(mode=mode, dtm=f'{in_channels}->{out_channels} on {height}x{width}',
                     **summarise(*times), **differences))
    rows += [dict(mode=mode, dtm='all DTMs', **summarise(*totals[mode])) for mode in MODES]
    print(f'LIT-{args.arch} at {args.size}x{args.size}, batch {args.batch}, {args.threads} '
          f'threads, {args.timer} clock, {args.rounds} rounds (+{args.warmup} warm-up), '
          f'torch {torch.__version__}')
    print('| mode | DTM | mmcv ms | torchvision ms | torchvision / mmcv (median of per-round '
          'ratios) | max relative diff (output, gradients) |')
    print('|---|---|---|---|---|---|')
    for row in rows:
        grads = [value for key, value in row.items() if key.startswith('grad_')]
        diffs = f'{row["output"]:.1e}, {max(grads):.1e}' if 'output' in row else ''
        print(f'| {row["mode"]} | {row["dtm"]} | {row["mmcv_ms"]:.1f} | '
              f'{row["torchvision_ms"]:.1f} | {row["ratio"]:.3f} | {diffs} |')
    if args.out_json:
        environment = dict(
            torch=torch.__version__, threads=torch.get_num_threads(), batch=args.batch,
            arch=args.arch, size=args.size, timer=args.timer, rounds=args.rounds,
            warmup=args.warmup, cpu=platform.processor() or platform.machine())
        with open(args.out_json, 'w') as file:
            json.dump(dict(environment=environment, rows=rows), file, indent=2)
    return rows


if __name__ == '__main__':
    main()
