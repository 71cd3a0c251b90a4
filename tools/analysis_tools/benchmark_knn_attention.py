# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Benchmark k-NN attention: ours vs the authors' mask-and-scatter vs dense attention.

For each sequence length N it times forward + backward (warm-up, then the median of the
timed runs) and measures the peak memory the attention adds, for

* ``knn``: ``mmsparsevit.models.layers.knn_attention`` (chunked, threshold selection,
  recomputing backward);
* ``mask_scatter``: the formulation of the authors' code (damo-cv/KVT): a dense N x N float
  mask, ``scatter_`` of the top-k indices into it, ``where`` with ``-inf``, softmax;
* ``dense``: plain softmax attention over all keys (materialised N x N probabilities);
* ``sdpa`` (optional): ``F.scaled_dot_product_attention`` over all keys.

Every (method, N) runs in a fresh subprocess so that its peak memory is its own:

* CUDA: ``torch.cuda.max_memory_allocated()`` minus the memory allocated before the run.
* CPU: the resident-set high-water mark. After the timed runs the worker tells glibc to
  serve every block of 64 KiB or more by ``mmap`` (``mallopt(M_MMAP_THRESHOLD)``) and to
  return its cached free memory (``malloc_trim``), so that freed tensors leave the resident
  set at once instead of staying in the heap; then it resets the kernel's peak counter
  (writing ``5`` to ``/proc/self/clear_refs``), runs forward + backward once and reports
  ``VmHWM - VmRSS(before)``: the true peak of live memory of that pass, including
  temporaries, autograd's saved tensors and gradients. (Timing runs before this switch, with
  glibc's normal caching, as in real training.)

Outputs of ``knn`` and ``mask_scatter`` (forward output and the gradients of q, k, v) are
compared on the same inputs for every N where both run.

Example::

    python tools/analysis_tools/benchmark_knn_attention.py \\
        --sizes 49 196 784 3136 12544 --out work_dirs/knn_bench

``--interleaved`` instead compares ``knn``, ``sdpa`` and ``mask_scatter`` side by side in
this one process, forward alone (``no_grad``) and forward + backward, for every N of
``--sizes`` and every k of ``--topks``: per round one pass of each, the order alternating
(``time_in_turns`` of ``measure.benchmark``), and the ratios are medians of the per-round
ratios, which a drift of the machine's speed between rounds does not move. Beside them, in the
same turns, the *selection floor*: the logits and ``torch.topk``'s k-th largest logit per row
in the same chunks, the least a forward that selects with ``torch.topk`` must spend (the
cheapest exact selection measured; docs/model_zoo.md lists the others)::

    python tools/analysis_tools/benchmark_knn_attention.py --interleaved --threads 2 \\
        --sizes 3136 12544 --topks 0.5 100 --batch-at 12544:1 --rounds-at 12544:3
"""
import argparse
import csv
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from measure.benchmark import PeakMemoryProbe, time_in_turns
from mmsparsevit.models.layers.knn_attention import default_chunk_rows, knn_attention, resolve_topk
from transcriptions import mask_scatter_knn_attention

METHODS = ('knn', 'mask_scatter', 'dense', 'sdpa')
INTERLEAVED_METHODS = ('knn', 'sdpa', 'mask_scatter')
PASSES = ('forward', 'forward+backward')


def mask_scatter_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           topk: int) -> torch.Tensor:
    """The authors' k-NN attention: dense float mask, scatter of top-k indices, where."""
    logits = query @ key.transpose(-2, -1) * query.shape[-1]**-0.5
    return mask_scatter_knn_attention(logits, value, topk)


def dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    topk: int) -> torch.Tensor:
    """Softmax attention over all keys with a materialised probability matrix."""
    logits = query @ key.transpose(-2, -1) * query.shape[-1]**-0.5
    return logits.softmax(dim=-1) @ value


def sdpa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   topk: int) -> torch.Tensor:
    """PyTorch's fused attention over all keys."""
    return F.scaled_dot_product_attention(query, key, value)


def selection_floor(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, topk: int,
                    chunk_size: Optional[int] = None) -> torch.Tensor:
    """What a k-NN forward that selects with ``torch.topk`` must spend: the logits and the
    k-th largest logit of every row, in ``knn_attention``'s query chunks; no softmax, no
    product with the values."""
    rows = chunk_size or default_chunk_rows(query.shape, key.shape[-2])
    scaled_query = query * query.shape[-1]**-0.5
    thresholds = []
    for start in range(0, query.shape[-2], rows):
        logits = scaled_query[..., start:start + rows, :] @ key.transpose(-2, -1)
        thresholds.append(torch.topk(logits, topk, dim=-1, sorted=False).values.amin(-1))
    return torch.cat(thresholds, dim=-1)


def build_method(name: str, chunk_size: Optional[int]) -> Callable:
    if name == 'knn':
        return lambda q, k, v, topk: knn_attention(q, k, v, topk, chunk_size=chunk_size)
    return dict(
        mask_scatter=mask_scatter_attention, dense=dense_attention, sdpa=sdpa_attention)[name]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', type=int, nargs='+', default=[49, 196, 784, 3136, 12544],
                        help='sequence lengths N (queries = keys)')
    parser.add_argument('--methods', nargs='+', choices=METHODS,
                        default=['knn', 'mask_scatter', 'dense'])
    parser.add_argument('--dim', type=int, default=64, help='head dimension')
    parser.add_argument('--heads', type=int, default=1)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--topk', type=float, default=0.5,
                        help='keys per query: a fraction of N in (0, 1] or an int >= 1 given '
                        'as a whole number above 1')
    parser.add_argument('--chunk-size', type=int, default=None,
                        help='query rows per chunk for knn (default: automatic)')
    parser.add_argument('--device', default='cpu', help='cpu or cuda[:i]')
    parser.add_argument('--amp', action='store_true',
                        help='run under torch.autocast (bfloat16 on CPU, float16 on CUDA)')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch CPU threads (default: torch default)')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--repeat', type=int, default=5,
                        help='timed runs; cases faster than 1 s get more (up to 50)')
    parser.add_argument('--max-run-seconds', type=float, default=5.0,
                        help='a case whose warm-up run takes longer is timed once')
    parser.add_argument('--skip', nargs='*', default=[], metavar='METHOD:N',
                        help='cases not to run, e.g. mask_scatter:12544')
    parser.add_argument('--no-check', action='store_true',
                        help='skip the knn vs mask_scatter output comparison')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default=None,
                        help='output prefix: writes <out>.csv and <out>.json')
    parser.add_argument('--interleaved', action='store_true',
                        help='time knn, sdpa and mask_scatter in turns in this process, '
                        'forward and forward + backward (see the module doc)')
    parser.add_argument('--topks', type=float, nargs='+', default=[0.5, 100],
                        help='--interleaved: the k of each case, as --topk')
    parser.add_argument('--rounds', type=int, default=5, help='--interleaved: timed rounds')
    parser.add_argument('--batch-at', nargs='*', default=[], metavar='N:BATCH',
                        help='--interleaved: another batch size for some N, e.g. 12544:1')
    parser.add_argument('--rounds-at', nargs='*', default=[], metavar='N:ROUNDS',
                        help='--interleaved: other timed rounds for some N, e.g. 12544:3')
    parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--worker-size', type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def topk_for(args: argparse.Namespace, num_keys: int, topk: Optional[float] = None) -> int:
    topk = args.topk if topk is None else topk
    spec = int(topk) if topk > 1 else float(topk)
    return resolve_topk(spec, num_keys)


def make_inputs(args: argparse.Namespace, size: int, device: torch.device,
                batch: Optional[int] = None):
    generator = torch.Generator().manual_seed(args.seed + size)
    shape = (args.batch if batch is None else batch, args.heads, size, args.dim)
    tensors = [torch.randn(shape, generator=generator).to(device).requires_grad_()
               for _ in range(3)]
    grad_out = torch.randn(shape, generator=generator).to(device)
    return tensors, grad_out


def autocast_context(args: argparse.Namespace, device: torch.device):
    if not args.amp:
        return nullcontext()
    dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def forward_backward(fn: Callable, inputs, grad_out, topk: int, args, device):
    for tensor in inputs:
        tensor.grad = None
    with autocast_context(args, device):
        out = fn(*inputs, topk)
    out.backward(grad_out.to(out.dtype))
    return out


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def run_worker(args: argparse.Namespace) -> Dict:
    """Time and measure one (method, N) case in this (fresh) process."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.worker_size
    topk = topk_for(args, size)
    fn = build_method(args.worker, args.chunk_size)
    inputs, grad_out = make_inputs(args, size, device)

    times = []
    for _ in range(max(1, args.warmup)):
        start = time.perf_counter()
        forward_backward(fn, inputs, grad_out, topk, args, device)
        synchronize(device)
        times.append(time.perf_counter() - start)
    if times[-1] > args.max_run_seconds:
        repeat = 1
    else:
        # Fast cases get more runs (up to ~1 s of them) for a stable median.
        repeat = max(args.repeat, min(50, int(1.0 / max(times[-1], 1e-6))))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        forward_backward(fn, inputs, grad_out, topk, args, device)
        synchronize(device)
        times.append(time.perf_counter() - start)

    # Peak memory of one more forward + backward, measured on its own.
    probe = PeakMemoryProbe(device)
    probe.start()
    forward_backward(fn, inputs, grad_out, topk, args, device)
    _, extra_mib = probe.stop()
    return dict(
        method=args.worker,
        n=size,
        topk=topk,
        time_ms=statistics.median(times) * 1000,
        runs=repeat,
        peak_mem_mib=extra_mib)


def compare_outputs(args: argparse.Namespace, size: int) -> Dict:
    """Max abs differences of output and q/k/v gradients, knn vs mask_scatter."""
    device = torch.device(args.device)
    topk = topk_for(args, size)
    inputs, grad_out = make_inputs(args, size, device)
    results = []
    for name in ('knn', 'mask_scatter'):
        out = forward_backward(
            build_method(name, args.chunk_size), inputs, grad_out, topk, args, device)
        results.append([out.detach().float()] + [t.grad.float() for t in inputs])
    diffs = [(a - b).abs().max().item() for a, b in zip(*results)]
    return dict(n=size, max_abs_diff_out=diffs[0], max_abs_diff_grad=max(diffs[1:]))


def run_case(args: argparse.Namespace, method: str, size: int,
             argv: List[str]) -> Optional[Dict]:
    cmd = [sys.executable, os.path.abspath(__file__)] + argv + [
        '--worker', method, '--worker-size', str(size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f'{method} N={size} failed:\n{proc.stderr[-2000:]}', file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def per_size(pairs: List[str], size: int, default: int) -> int:
    """The value of ``N:VALUE`` pairs for ``size``, ``default`` where none is given."""
    values = dict(pair.split(':') for pair in pairs)
    return int(values.get(str(size), default))


def timed_pass(fn: Callable, inputs, grad_out, topk: int, args, device,
               kind: str) -> Callable[[], float]:
    """A callable running one forward (no_grad) or forward + backward pass, timed."""

    def step() -> float:
        start = time.perf_counter()
        if kind == 'forward':
            with torch.no_grad(), autocast_context(args, device):
                fn(*inputs, topk)
        else:
            forward_backward(fn, inputs, grad_out, topk, args, device)
        synchronize(device)
        return time.perf_counter() - start

    return step


def median_ratio(numerator: List[float], denominator: List[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def run_interleaved(args: argparse.Namespace) -> List[Dict]:
    """knn vs sdpa vs mask_scatter for every (N, k, pass), timed in turns in this process."""
    device = torch.device(args.device)
    rows = []
    print('| N | batch | k | pass | knn ms | sdpa ms | authors ms | knn / sdpa | '
          'authors / knn | logits + topk ms (/ sdpa) | rounds | '
          'max abs diff knn vs authors (out, grads) |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|', flush=True)
    for size in args.sizes:
        batch = per_size(args.batch_at, size, args.batch)
        rounds = per_size(args.rounds_at, size, args.rounds)
        inputs, grad_out = make_inputs(args, size, device, batch)
        for spec in args.topks:
            topk = topk_for(args, size, spec)
            methods = [build_method(name, args.chunk_size) for name in INTERLEAVED_METHODS]
            # Outputs and gradients of ours vs the authors' on these very inputs.
            outputs = []
            for fn in (methods[0], methods[2]):
                out = forward_backward(fn, inputs, grad_out, topk, args, device)
                outputs.append([out.detach().float()] + [t.grad.float() for t in inputs])
            diffs = [(a - b).abs().max().item() for a, b in zip(*outputs)]
            del outputs
            # The selection floor is a forward-only cost (backward reuses the forward's
            # thresholds), timed in the same turns as the passes it bounds.
            floor = functools.partial(selection_floor, chunk_size=args.chunk_size)
            for kind in PASSES:
                steps = [timed_pass(fn, inputs, grad_out, topk, args, device, kind)
                         for fn in methods]
                steps.append(timed_pass(floor, inputs, grad_out, topk, args, device, 'forward'))
                times = [seconds[args.warmup:] for seconds in
                         time_in_turns(steps, args.warmup + rounds)]
                knn, sdpa, authors, floor_times = times
                row = dict(
                    n=size, batch=batch, topk=topk, pass_=kind, rounds=rounds,
                    knn_ms=1000 * statistics.median(knn),
                    sdpa_ms=1000 * statistics.median(sdpa),
                    mask_scatter_ms=1000 * statistics.median(authors),
                    knn_over_sdpa=median_ratio(knn, sdpa),
                    mask_scatter_over_knn=median_ratio(authors, knn),
                    selection_floor_ms=1000 * statistics.median(floor_times),
                    selection_floor_over_sdpa=median_ratio(floor_times, sdpa),
                    round_ms={name: [1000 * t for t in seconds]
                              for name, seconds in zip(INTERLEAVED_METHODS +
                                                       ('selection_floor', ), times)},
                    max_abs_diff_out=diffs[0], max_abs_diff_grad=max(diffs[1:]))
                rows.append(row)
                print(f"| {size} | {batch} | {topk} | {kind} | {row['knn_ms']:.1f} | "
                      f"{row['sdpa_ms']:.1f} | {row['mask_scatter_ms']:.1f} | "
                      f"{row['knn_over_sdpa']:.2f} | {row['mask_scatter_over_knn']:.2f} | "
                      f"{row['selection_floor_ms']:.1f} ({row['selection_floor_over_sdpa']:.2f})"
                      f" | {rounds} | {diffs[0]:.1e}, {max(diffs[1:]):.1e} |", flush=True)
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.interleaved:
        rows = run_interleaved(args)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            meta = dict(device=args.device, threads=torch.get_num_threads(),
                        torch=torch.__version__, python=platform.python_version(),
                        machine=platform.processor() or platform.machine(), amp=args.amp,
                        dim=args.dim, heads=args.heads, warmup=args.warmup)
            with open(args.out + '.json', 'w') as json_file:
                json.dump(dict(meta=meta, results=rows), json_file, indent=2)
        return
    skip = set(args.skip)
    rows, checks = [], []
    for size in args.sizes:
        by_method = {}
        for method in args.methods:
            if f'{method}:{size}' in skip:
                continue
            row = run_case(args, method, size, argv)
            if row is not None:
                by_method[method] = row
        reference = by_method.get('mask_scatter')
        for method, row in by_method.items():
            if reference is not None:
                row['speedup_vs_mask_scatter'] = reference['time_ms'] / row['time_ms']
                row['mem_ratio_vs_mask_scatter'] = (
                    reference['peak_mem_mib'] / row['peak_mem_mib']
                    if row['peak_mem_mib'] > 0 else float('nan'))
            rows.append(row)
            print(f"N={size:6d} k={row['topk']:6d} {method:13s} "
                  f"{row['time_ms']:10.1f} ms ({row['runs']} runs)  "
                  f"peak {row['peak_mem_mib']:9.1f} MiB  "
                  f"speedup {row.get('speedup_vs_mask_scatter', float('nan')):5.2f}x  "
                  f"memory {row.get('mem_ratio_vs_mask_scatter', float('nan')):5.2f}x",
                  flush=True)
        if not args.no_check and 'knn' in by_method and reference is not None:
            check = compare_outputs(args, size)
            checks.append(check)
            print(f"N={size:6d} knn vs mask_scatter: max |diff| output "
                  f"{check['max_abs_diff_out']:.2e}, gradients "
                  f"{check['max_abs_diff_grad']:.2e}", flush=True)

    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        fields = ['n', 'topk', 'method', 'time_ms', 'runs', 'peak_mem_mib',
                  'speedup_vs_mask_scatter', 'mem_ratio_vs_mask_scatter']
        with open(args.out + '.csv', 'w', newline='') as csv_file:
            writer = csv.DictWriter(csv_file, fieldnames=fields, extrasaction='ignore')
            writer.writeheader()
            writer.writerows(rows)
        meta = dict(
            device=args.device,
            threads=torch.get_num_threads(),
            torch=torch.__version__,
            python=platform.python_version(),
            machine=platform.processor() or platform.machine(),
            amp=args.amp,
            dim=args.dim,
            heads=args.heads,
            batch=args.batch,
            topk=args.topk,
            chunk_size=args.chunk_size,
            memory_method=('cuda max_memory_allocated' if args.device.startswith('cuda') else
                           'VmHWM - VmRSS of one pass in a fresh process, glibc mmap '
                           'threshold 64 KiB (measure.benchmark.PeakMemoryProbe)'))
        with open(args.out + '.json', 'w') as json_file:
            json.dump(dict(meta=meta, results=rows, checks=checks), json_file, indent=2)


if __name__ == '__main__':
    main()
