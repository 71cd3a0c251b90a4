# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Time and memory of vicinity attention against softmax attention, and of the VVT backbone.

Part 1 (attention): one attention layer on an S x S token map for growing S, forward +
backward, vicinity attention (:class:`VicinityAttention`) against a standard multi-head
softmax attention of the same width that materialises the N x N matrix. Each row reports
the median time, the peak memory of the tensors it allocates, the page faults of one pass
and the growth factor against the previous map (4x tokens when S doubles): linear for
vicinity, quadratic for softmax. The sizes of one layer are timed in turns, one pass of each
per round, and the time growth is the median of the per-round ratios: a drift of the
machine's speed during the run moves both sides of a ratio alike.

Part 2 (backbone): a VVT preset at several square input sizes, forward and/or forward +
backward.

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak of live tensor
storage allocated by the measured call, tracked per operator (kernel-internal scratch
buffers are not seen). Times: warm-up runs, then the median of ``--repeat`` runs, by the
wall clock or (``--timer cpu``, with ``--threads 1``) by this process's CPU time, which a
busy shared machine disturbs much less. With glibc's default thresholds, tensors of a few
MiB are page-faulted anew every pass, a cost that appears only above those thresholds and
so bends the time curve between sizes; ``--retain-freed-memory`` keeps freed memory in the
process, as caching allocators do (the page-fault column shows the difference).

Examples:
    python tools/analysis_tools/benchmark_vicinity_attention.py --threads 2
    python tools/analysis_tools/benchmark_vicinity_attention.py --device cuda --amp \\
        --sides 64 128 256 --sizes 224 512 1024 --out-json vvt_bench.json
"""
import argparse
import csv
import json
import platform
import resource
import statistics
import time
import weakref
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from measure.benchmark import retain_freed_memory, time_in_turns
from mmsparsevit.models.backbones.vvt import VVT
from mmsparsevit.models.layers import VicinityAttention


class SoftmaxAttention(nn.Module):
    """Multi-head softmax self-attention that materialises the N x N weights (the baseline).

    Args:
        embed_dims (int): Token channels.
        num_heads (int): Attention heads.
    """

    def __init__(self, embed_dims: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(embed_dims, 3 * embed_dims)
        self.proj = nn.Linear(embed_dims, embed_dims)

    def forward(self, x: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        weights = (query @ key.transpose(-2, -1)) * query.shape[-1]**-0.5
        out = weights.softmax(dim=-1) @ value
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, channels))


class TensorPeakMemory(TorchDispatchMode):
    """Peak bytes of live tensor storage allocated by operators run inside the context."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked = set()

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._tracked.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            id(t.untyped_storage())
            for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)
        }
        for tensor in tree_leaves(out):
            if not isinstance(tensor, Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._tracked:
                continue  # a view or an in-place result: nothing new was allocated
            self._tracked.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], None],
              device: torch.device,
              warmup: int,
              repeat: int,
              clock: Callable[[], float] = time.perf_counter) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        synchronize(device)
        start = clock()
        fn()
        synchronize(device)
        times.append((clock() - start) * 1e3)
    return statistics.median(times)


def peak_mb(fn: Callable[[], None], device: torch.device) -> float:
    """Peak extra memory of one call of ``fn`` in MiB."""
    if device.type == 'cuda':
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with TensorPeakMemory() as tracker:
        fn()
    return tracker.peak / 2**20


def page_faults(fn: Callable[[], None]) -> int:
    """Page faults (minor + major) of this process during one call of ``fn``."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return (after.ru_minflt - before.ru_minflt) + (after.ru_majflt - before.ru_majflt)


def autocast_context(device: torch.device, amp: bool):
    if not amp:
        return nullcontext()
    dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def interleaved_ms(steps: Sequence[Callable[[], None]],
                   device: torch.device,
                   warmup: int,
                   repeat: int,
                   clock: Callable[[], float] = time.perf_counter) -> List[List[float]]:
    """Per-round times (ms) of several steps run in turns (:func:`time_in_turns`), after
    ``warmup`` untimed rounds."""
    for _ in range(warmup):
        for step in steps:
            step()

    def timed(step: Callable[[], None]) -> Callable[[], float]:

        def run() -> float:
            synchronize(device)
            start = clock()
            step()
            synchronize(device)
            return (clock() - start) * 1e3

        return run

    return time_in_turns([timed(step) for step in steps], repeat)


def attention_rows(args: argparse.Namespace, device: torch.device) -> List[Dict]:
    """Each layer at every side; the sides of one layer are timed in turns
    (:func:`interleaved_ms`) and ``time_growth`` is the median of the per-round ratios of
    consecutive sides."""
    layers = {
        'vicinity':
        VicinityAttention(
            args.dim, args.heads, feature_reduction=args.feature_reduction).to(device),
        'softmax':
        SoftmaxAttention(args.dim, args.heads).to(device),
    }
    rows = []
    for method, layer in layers.items():
        sides = [
            side for side in args.sides
            if method != 'softmax' or side * side <= args.softmax_max_tokens
        ]

        def make_step(side: int) -> Callable[[], None]:
            x = torch.randn(args.batch, side * side, args.dim, device=device,
                            requires_grad=True)

            def step() -> None:
                with autocast_context(device, args.amp):
                    out = layer(x, (side, side))
                out.float().square().mean().backward()
                layer.zero_grad(set_to_none=True)
                x.grad = None

            return step

        steps = [make_step(side) for side in sides]
        times = interleaved_ms(steps, device, args.warmup, args.repeat, args.clock)
        for index, (side, step) in enumerate(zip(sides, steps)):
            tokens = side * side
            row = dict(
                part='attention', method=method, tokens=tokens, side=side, batch=args.batch,
                dim=args.dim, mode='fwd+bwd', median_ms=statistics.median(times[index]),
                peak_mb=peak_mb(step, device), page_faults=page_faults(step))
            if index > 0:
                previous = rows[-1]
                row['time_growth'] = statistics.median(
                    now / before for now, before in zip(times[index], times[index - 1]))
                row['memory_growth'] = row['peak_mb'] / previous['peak_mb']
                row['token_growth'] = tokens / previous['tokens']
            rows.append(row)
            print_row(row)
    return rows


def backbone_rows(args: argparse.Namespace, device: torch.device) -> List[Dict]:
    model = VVT(arch=args.arch, drop_path_rate=0.).to(device)
    rows = []
    for mode in args.backbone_modes:
        for size in args.sizes:
            x = torch.randn(args.backbone_batch, 3, size, size, device=device)
            if mode == 'fwd':
                model.eval()

                def step() -> None:
                    with torch.no_grad(), autocast_context(device, args.amp):
                        model(x)
            else:
                model.train()

                def step() -> None:
                    with autocast_context(device, args.amp):
                        outs = model(x)
                    sum(out.float().square().mean() for out in outs).backward()
                    model.zero_grad(set_to_none=True)

            row = dict(
                part='backbone', method=f'VVT-{args.arch}', tokens=(size // 4)**2, side=size,
                batch=args.backbone_batch, mode=mode,
                median_ms=median_ms(step, device, args.warmup, args.repeat, args.clock),
                peak_mb=peak_mb(step, device))
            rows.append(row)
            print_row(row)
    return rows


def print_row(row: Dict) -> None:
    growth = ''
    if 'time_growth' in row:
        growth = (f'  x{row["token_growth"]:.0f} tokens -> time x{row["time_growth"]:.2f}, '
                  f'memory x{row["memory_growth"]:.2f}')
    faults = f'  {row["page_faults"]:6d} page faults' if 'page_faults' in row else ''
    print(f'{row["part"]:9s} {row["method"]:10s} {row["mode"]:7s} side={row["side"]:<5d} '
          f'tokens={row["tokens"]:<7d} {row["median_ms"]:10.1f} ms {row["peak_mb"]:9.1f} MiB'
          f'{faults}{growth}', flush=True)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, help='CPU threads (torch.set_num_threads)')
    parser.add_argument(
        '--amp', action='store_true', help='autocast: bfloat16 on CPU, float16 on CUDA')
    parser.add_argument(
        '--timer', choices=('wall', 'cpu'), default='wall',
        help='wall clock, or CPU time of this process (steadier on a shared machine; '
        'CPU only, use with --threads 1)')
    parser.add_argument(
        '--retain-freed-memory', action='store_true',
        help="keep freed memory in the process (glibc mallopt), so that large tensors are not "
        'page-faulted anew every pass; see measure.benchmark.retain_freed_memory')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--repeat', type=int, default=7)
    parser.add_argument(
        '--sides', type=int, nargs='+', default=(28, 56, 112),
        help='token-map sides of the attention benchmark (tokens = side^2)')
    parser.add_argument('--dim', type=int, default=64)
    parser.add_argument('--heads', type=int, default=1)
    parser.add_argument('--feature-reduction', type=int, default=2)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument(
        '--softmax-max-tokens', type=int, default=12544,
        help='skip softmax attention above this many tokens (its N x N matrix)')
    parser.add_argument('--arch', default='small', help='VVT preset of the backbone benchmark')
    parser.add_argument('--sizes', type=int, nargs='+', default=(224, 512, 1024))
    parser.add_argument('--backbone-batch', type=int, default=1)
    parser.add_argument(
        '--backbone-modes', nargs='+', choices=('fwd', 'fwd+bwd'), default=('fwd+bwd', ))
    parser.add_argument('--skip-attention', action='store_true')
    parser.add_argument('--skip-backbone', action='store_true')
    parser.add_argument('--out-csv', help='write the rows as CSV')
    parser.add_argument('--out-json', help='write the rows and the environment as JSON')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.timer == 'cpu' and device.type != 'cpu':
        raise SystemExit('--timer cpu measures CPU time and needs --device cpu')
    args.clock = time.process_time if args.timer == 'cpu' else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.retain_freed_memory and not retain_freed_memory():
        raise SystemExit('--retain-freed-memory needs glibc (mallopt refused or missing)')
    torch.manual_seed(0)
    environment = dict(
        torch=torch.__version__, device=str(device), threads=torch.get_num_threads(),
        amp=args.amp, timer=args.timer, retain_freed_memory=args.retain_freed_memory,
        cpu=platform.processor() or platform.machine(),
        gpu=torch.cuda.get_device_name(device) if device.type == 'cuda' else None)
    print(json.dumps(environment))
    rows = []
    if not args.skip_attention:
        rows += attention_rows(args, device)
    if not args.skip_backbone:
        rows += backbone_rows(args, device)
    if args.out_csv:
        fields = sorted({key for row in rows for key in row})
        with open(args.out_csv, 'w', newline='') as file:
            writer = csv.DictWriter(file, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    if args.out_json:
        with open(args.out_json, 'w') as file:
            json.dump(dict(environment=environment, rows=rows), file, indent=2)
    return rows


if __name__ == '__main__':
    main()
