"""Latency, throughput and peak memory of a model, one case per fresh process.

A case is (model, input size, batch size, inference or training, device). Each case runs in
its own Python process so that its peak memory is its own: nothing allocated, cached or
fragmented by an earlier case counts against it.

Memory method (one extra pass after the timed ones, so it does not perturb them):

* CPU: the kernel's resident-set high-water mark. glibc is first told to serve every block
  of 64 KiB or more with ``mmap`` (``mallopt(M_MMAP_THRESHOLD)``) and to hand its cached
  free pages back (``malloc_trim``), so that the resident set follows live memory instead of
  the allocator's cache. Then ``/proc/self/clear_refs`` is written ``5`` (Linux >= 4.0),
  which resets ``VmHWM`` to the current resident set, one pass runs, and ``VmHWM`` is its
  peak. ``extra_mem_mb`` = that peak - the resident set before the pass: activations,
  temporaries, autograd's saved tensors and, in training, gradients. Where ``clear_refs``
  cannot be written, ``ru_maxrss`` (peak of the whole process, model building included) is
  reported and ``mem_method`` says so.
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; extra =
  peak - memory allocated before the pass.

Latency: ``warmup`` untimed passes, then ``repeats`` timed passes (CUDA synchronised);
the median is reported with min/mean/max. To compare models with each other rather than
measure each alone, :func:`measure_interleaved` holds them in one process and alternates
them pass by pass, so that the machine's drift falls on all of them alike.
``timer='wall'`` reads the wall clock; ``timer='cpu'`` (CPU, one thread) reads this
process's CPU time, which other processes on a busy shared machine disturb far less than the
wall clock. Training = forward + backward of
the sum of the outputs (``mode='tensor'`` for full models; no loss target assignment), with
``zero_grad(set_to_none=True)`` between passes.
"""
import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.logging import print_log

from .authors import build_authors_model
from .flops import count_parameters
from .model_builder import (build_model, forward_fn, load_model_spec, select_backbone, sum_outputs,
                            synthetic_batch)
from .pairs import build_pair

MODES = ('inference', 'train')
TIMERS = ('wall', 'cpu')
IMPLEMENTATIONS = ('ours', 'plain')
AUTHORS = 'authors'

_TOOLS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REPO_ROOT = os.path.dirname(os.path.dirname(_TOOLS_DIR))


@dataclass
class BenchmarkCase:
    """One measurement.

    Args:
        shape (tuple[int, int]): Input (height, width).
        batch_size (int): Images per batch.
        mode (str): 'inference' (no_grad forward, eval mode) or 'train' (forward +
            backward, train mode).
        config (str, optional): Config file. Defaults to None.
        backbone (str, optional): Backbone preset or dict literal (instead of a config).
            Defaults to None.
        backbone_only (bool): Measure only the backbone of a full model. Defaults to False.
        device (str): 'cpu' or 'cuda'. Defaults to 'cpu'.
        warmup (int): Untimed passes. Defaults to 2.
        repeats (int): Timed passes. Defaults to 5.
        threads (int, optional): torch CPU threads; None keeps torch's default.
            Defaults to None.
        cfg_options (dict): Config overrides. Defaults to empty.
        label (str, optional): Name in the results. Defaults to the source.
        timer (str): 'wall' or 'cpu' (process CPU time; needs ``device='cpu'`` and
            ``threads=1``). Defaults to 'wall'.
        implementation (str, optional): 'ours', 'plain' or 'authors': measure ``backbone``
            (a preset of :mod:`measure.pairs`) as built for the comparison with its plain
            transcription, that transcription, or the authors' own model imported from the
            checkout ``authors_repo`` with the transcription's weights
            (:mod:`measure.authors`). Defaults to None (the model as the config or preset
            builds it).
        authors_repo (str, optional): Checkout of the authors' repository, for
            ``implementation='authors'``. Defaults to None.
    """
    shape: Tuple[int, int]
    batch_size: int
    mode: str
    config: Optional[str] = None
    backbone: Optional[str] = None
    backbone_only: bool = False
    device: str = 'cpu'
    warmup: int = 2
    repeats: int = 5
    threads: Optional[int] = None
    cfg_options: Dict[str, Any] = field(default_factory=dict)
    label: Optional[str] = None
    timer: str = 'wall'
    implementation: Optional[str] = None
    authors_repo: Optional[str] = None

    def __post_init__(self) -> None:
        if self.timer not in TIMERS:
            raise ValueError(f'timer must be one of {TIMERS}, got {self.timer!r}')
        if self.timer == 'cpu' and (self.device != 'cpu' or self.threads != 1):
            raise ValueError('timer="cpu" measures process CPU time: it needs device="cpu" '
                             f'and threads=1, got device={self.device!r}, '
                             f'threads={self.threads!r}')
        implementations = IMPLEMENTATIONS + (AUTHORS, )
        if self.implementation is not None and (self.implementation not in implementations
                                                or self.backbone is None):
            raise ValueError(f'implementation must be one of {implementations} and needs a '
                             f'backbone preset, got {self.implementation!r} with backbone '
                             f'{self.backbone!r}')
        if (self.implementation == AUTHORS) != (self.authors_repo is not None):
            raise ValueError('authors_repo is the checkout of implementation="authors" and '
                             f'only of it, got implementation={self.implementation!r}, '
                             f'authors_repo={self.authors_repo!r}')
        if self.mode not in MODES:
            raise ValueError(f'mode must be one of {MODES}, got {self.mode!r}')
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f'need repeats >= 1 and warmup >= 0, got {self.repeats}, '
                             f'{self.warmup}')
        self.shape = tuple(self.shape)
        if self.label is None:
            self.label = self.config or self.backbone

    def describe(self) -> str:
        return (f'{self.label} {self.shape[0]}x{self.shape[1]} bs{self.batch_size} '
                f'{self.mode} on {self.device}')


def _resident_kib() -> int:
    with open('/proc/self/statm') as file:
        return int(file.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') // 1024


def _status_kib(key: str) -> int:
    with open('/proc/self/status') as file:
        for line in file:
            if line.startswith(key + ':'):
                return int(line.split()[1])
    raise KeyError(key)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def _glibc() -> Optional[ctypes.CDLL]:
    try:
        return ctypes.CDLL('libc.so.6')
    except OSError:
        return None


def _release_cached_heap() -> bool:
    """Make glibc return freed blocks of >= 64 KiB to the kernel at once (see module doc)."""
    libc = _glibc()
    return (libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024))
            and libc.malloc_trim(0) >= 0)


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory in the process for reuse instead of returning it.

    By default glibc serves large blocks with fresh ``mmap`` pages and trims the heap's top
    after large frees, so a tensor of a few MiB allocated anew every pass is page-faulted
    (zeroed by the kernel, cache-cold) every pass: measured as 20 % of one vicinity attention
    pass at 12544 tokens, and none at 3136 tokens, whose tensors stay below the thresholds.
    That cost depends on the allocator's thresholds, not on the computation. Sets the mmap
    threshold to its maximum (32 MiB on 64-bit systems) and the trim threshold to 2 GiB,
    which is what a caching allocator (jemalloc, tcmalloc, PyTorch's CUDA allocator) does
    anyway.

    Returns:
        bool: Whether glibc accepted both settings (False elsewhere).
    """
    libc = _glibc()
    return (libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20))
            and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)))


def _reset_peak_rss() -> bool:
    try:
        with open('/proc/self/clear_refs', 'w') as file:
            file.write('5')
        return True
    except OSError:
        return False


class PeakMemoryProbe:
    """Peak memory of what runs between :meth:`start` and :meth:`stop` (see module doc)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.method = 'cuda max_memory_allocated'
            return
        gc.collect()
        trimmed = _release_cached_heap()
        self.baseline = _resident_kib() * 1024
        if _reset_peak_rss():
            self.method = 'cpu VmHWM after clear_refs' + (', mmap threshold 64 KiB'
                                                          if trimmed else '')
        else:
            self.method = 'cpu ru_maxrss (whole process)'

    def stop(self) -> Tuple[float, float]:
        """(peak MiB, extra over the baseline MiB)."""
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith('cpu VmHWM'):
            peak = _status_kib('VmHWM') * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak / 2**20, max(peak - self.baseline, 0) / 2**20


def _build_case_model(case: BenchmarkCase) -> torch.nn.Module:
    if case.implementation == AUTHORS:
        plain = build_pair(case.backbone)[1]
        return build_authors_model(case.backbone, case.authors_repo, plain.state_dict())
    if case.implementation is not None:
        return build_pair(case.backbone)[IMPLEMENTATIONS.index(case.implementation)]
    model_cfg, scope = load_model_spec(case.config, case.backbone, case.cfg_options)
    return select_backbone(build_model(model_cfg, scope), case.backbone_only)


class _PreparedCase:
    """A case's model on its device with its input, and one timed pass of it."""

    def __init__(self, case: BenchmarkCase) -> None:
        self.case = case
        self.device = torch.device(case.device)
        self.model = _build_case_model(case).to(self.device)
        self.training = case.mode == 'train'
        self.model.train(self.training)
        images, data_samples = synthetic_batch(self.model, case.shape, case.batch_size,
                                               self.device)
        self.forward = forward_fn(self.model, images, data_samples)
        self.clock = time.process_time if case.timer == 'cpu' else time.perf_counter

    def step(self) -> None:
        if self.training:
            self.model.zero_grad(set_to_none=True)
            loss = sum_outputs(self.forward())
            if loss is None:
                raise RuntimeError(
                    f'{self.case.label}: no output requires grad, nothing to train')
            loss.backward()
        else:
            with torch.no_grad():
                self.forward()

    def timed_step(self) -> float:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        start = self.clock()
        self.step()
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        return self.clock() - start

    def peak_memory(self) -> Tuple[float, float, str]:
        """(peak MiB, extra MiB, method) of one more pass, after the timed ones."""
        probe = PeakMemoryProbe(self.device)
        probe.start()
        self.step()
        peak_mb, extra_mb = probe.stop()
        return peak_mb, extra_mb, probe.method

    def row(self, times: List[float]) -> Dict[str, Any]:
        peak_mb, extra_mb, method = self.peak_memory()
        median = statistics.median(times)
        row = asdict(self.case)
        row.update(
            height=self.case.shape[0],
            width=self.case.shape[1],
            threads=torch.get_num_threads(),
            params=count_parameters(self.model),
            median_ms=1000 * median,
            mean_ms=1000 * statistics.fmean(times),
            min_ms=1000 * min(times),
            max_ms=1000 * max(times),
            images_per_s=self.case.batch_size / median,
            peak_mem_mb=peak_mb,
            extra_mem_mb=extra_mb,
            mem_method=method,
            error='')
        row.pop('shape')
        row.pop('cfg_options')
        return row


def measure_case(case: BenchmarkCase) -> Dict[str, Any]:
    """Run ``case`` in this process and return its result row."""
    if case.threads:
        torch.set_num_threads(case.threads)
    prepared = _PreparedCase(case)
    for index in range(case.warmup):
        seconds = prepared.timed_step()
        print_log(f'  warm-up {index + 1}/{case.warmup}: {1000 * seconds:.1f} ms',
                  logger='current')
    times: List[float] = []
    for index in range(case.repeats):
        times.append(prepared.timed_step())
        print_log(f'  run {index + 1}/{case.repeats}: {1000 * times[-1]:.1f} ms',
                  logger='current')
    return prepared.row(times)


_SHARED_SETTINGS = ('shape', 'batch_size', 'mode', 'device', 'warmup', 'repeats', 'threads',
                    'timer')


def add_turn_arguments(parser: argparse.ArgumentParser, rounds: int) -> None:
    """Add the options of the tools that time in turns (:func:`time_in_turns`):
    ``--threads``, ``--timer``, ``--warmup`` and ``--rounds`` (default ``rounds``)."""
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads')
    parser.add_argument(
        '--timer', choices=TIMERS, default='wall',
        help='wall clock, or the CPU time of this process (all its threads), which other '
        'processes on a busy shared machine disturb far less')
    parser.add_argument('--warmup', type=int, default=2, help='untimed rounds')
    parser.add_argument('--rounds', type=int, default=rounds, help='timed rounds')


def time_in_turns(
    timed_steps: Sequence[Callable[[], float]],
    rounds: int,
    on_round: Optional[Callable[[int, List[List[float]]], None]] = None
) -> List[List[float]]:
    """Call several timed steps in turns: one call of each per round, in the given order for
    even rounds and reversed for odd ones, so that a drift of the machine's speed falls on
    all of them alike and none always runs right after the same other one.

    Args:
        timed_steps (Sequence[Callable[[], float]]): Each runs once and returns its time.
        rounds (int): Number of rounds.
        on_round (Callable, optional): Called after each round with its index and the
            times so far. Defaults to None.

    Returns:
        list[list[float]]: Per step, its time in every round.
    """
    times: List[List[float]] = [[] for _ in timed_steps]
    for round_index in range(rounds):
        order = list(range(len(timed_steps)))
        if round_index % 2:
            order.reverse()
        for index in order:
            times[index].append(timed_steps[index]())
        if on_round is not None:
            on_round(round_index, times)
    return times


def measure_interleaved(cases: Sequence[BenchmarkCase]) -> List[Dict[str, Any]]:
    """Time several models on the same input pass by pass, alternating, in this process.

    Round ``r`` runs one pass of every model, in the given order for even ``r`` and reversed
    for odd ``r``, so that a drift of the machine's speed (other tenants, frequency scaling)
    falls on all models alike and no model always runs right after the same other one.
    Each row carries its per-round times (``round_ms``) so that the caller can take the
    median of per-round ratios, which a drift between rounds does not move
    (:func:`paired_time_ratio`). Peak memory is then measured per model as in
    :func:`measure_case` (the extra memory of one pass over the resident set before it).

    Args:
        cases (Sequence[BenchmarkCase]): At least two cases that differ only in the model:
            same shape, batch size, mode, device, warm-up, repeats, threads and timer.

    Returns:
        list[dict]: One result row per case, in the order given.
    """
    if len(cases) < 2:
        raise ValueError(f'interleaving needs at least two cases, got {len(cases)}')
    for case in cases[1:]:
        differing = [
            key for key in _SHARED_SETTINGS
            if getattr(case, key) != getattr(cases[0], key)
        ]
        if differing:
            raise ValueError(f'interleaved cases must share {differing}: '
                             f'{cases[0].describe()} vs {case.describe()}')
    if cases[0].threads:
        torch.set_num_threads(cases[0].threads)
    prepared = [_PreparedCase(case) for case in cases]
    rounds = cases[0].warmup + cases[0].repeats

    def log_round(round_index: int, times: List[List[float]]) -> None:
        stage = 'warm-up' if round_index < cases[0].warmup else 'round'
        print_log(
            f'  {stage} {round_index + 1}/{rounds}: ' + ', '.join(
                f'{item.case.label} {1000 * seconds[-1]:.1f} ms'
                for item, seconds in zip(prepared, times)),
            logger='current')

    times = time_in_turns([item.timed_step for item in prepared], rounds, log_round)
    rows = []
    for item, seconds in zip(prepared, times):
        timed = seconds[cases[0].warmup:]
        row = item.row(timed)
        row['round_ms'] = [1000 * value for value in timed]
        rows.append(row)
    return rows


def paired_time_ratio(row: Dict[str, Any],
                      reference: Dict[str, Any]) -> Tuple[float, float, float]:
    """Median, lower and upper quartile of the per-round time ratios ``row / reference``.

    Both rows must come from one :func:`measure_interleaved` run (``round_ms``).
    """
    ratios = [
        value / reference_value
        for value, reference_value in zip(row['round_ms'], reference['round_ms'])
    ]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    lower, _, upper = statistics.quantiles(ratios, n=4, method='inclusive')
    return statistics.median(ratios), lower, upper


def failed_row(case: BenchmarkCase, error: str) -> Dict[str, Any]:
    """The result row of a case that did not finish."""
    row = asdict(case)
    row.update(height=case.shape[0], width=case.shape[1], error=error)
    row.pop('shape')
    row.pop('cfg_options')
    return row


def _run_worker(payload: Any, timeout: Optional[float]) -> Any:
    """Run the worker on ``payload`` in a fresh interpreter; its result, or the reason why
    there is none (a string)."""
    with tempfile.TemporaryDirectory() as workdir:
        spec_path = os.path.join(workdir, 'case.json')
        result_path = os.path.join(workdir, 'result.json')
        with open(spec_path, 'w') as file:
            json.dump(payload, file)
        command = [sys.executable, '-m', __name__, spec_path, result_path]
        env = dict(os.environ)
        # The worker imports this package and its sibling ``transcriptions`` from the tools'
        # folder, and mmsparsevit from the checkout the tools belong to.
        env['PYTHONPATH'] = os.pathsep.join(
            filter(None, [_TOOLS_DIR, _REPO_ROOT, env.get('PYTHONPATH')]))
        try:
            completed = subprocess.run(
                command, timeout=timeout, stderr=subprocess.PIPE, text=True, env=env)
        except subprocess.TimeoutExpired:
            return f'timed out after {timeout} s'
        if completed.returncode != 0 or not os.path.exists(result_path):
            lines = (completed.stderr or '').strip().splitlines()
            reason = lines[-1] if lines else f'exit status {completed.returncode}'
            if completed.returncode < 0:
                reason = f'killed by signal {-completed.returncode} (out of memory?)'
            return reason
        with open(result_path) as file:
            return json.load(file)


def run_case_in_subprocess(case: BenchmarkCase,
                           timeout: Optional[float] = None) -> Dict[str, Any]:
    """Run ``case`` in a fresh interpreter (its output, e.g. progress, passes through)."""
    result = _run_worker(asdict(case), timeout)
    return failed_row(case, result) if isinstance(result, str) else result


def run_interleaved_in_subprocess(cases: Sequence[BenchmarkCase],
                                  timeout: Optional[float] = None) -> List[Dict[str, Any]]:
    """:func:`measure_interleaved` in a fresh interpreter."""
    result = _run_worker([asdict(case) for case in cases], timeout)
    if isinstance(result, str):
        return [failed_row(case, result) for case in cases]
    return result


def _worker(spec_path: str, result_path: str) -> None:
    with open(spec_path) as file:
        spec = json.load(file)
    if isinstance(spec, list):
        result = measure_interleaved([BenchmarkCase(**case) for case in spec])
    else:
        result = measure_case(BenchmarkCase(**spec))
    with open(result_path, 'w') as file:
        json.dump(result, file)


if __name__ == '__main__':
    _worker(*sys.argv[1:3])
