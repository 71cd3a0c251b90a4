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
"""
import argparse
import csv
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

from measure.benchmark import PeakMemoryProbe
from mmsparsevit.models.layers.knn_attention import knn_attention, resolve_topk
from transcriptions import mask_scatter_knn_attention

METHODS = ('knn', 'mask_scatter', 'dense', 'sdpa')


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
    parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--worker-size', type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def topk_for(args: argparse.Namespace, num_keys: int) -> int:
    spec = int(args.topk) if args.topk > 1 else float(args.topk)
    return resolve_topk(spec, num_keys)


def make_inputs(args: argparse.Namespace, size: int, device: torch.device):
    generator = torch.Generator().manual_seed(args.seed + size)
    shape = (args.batch, args.heads, size, args.dim)
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


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
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
