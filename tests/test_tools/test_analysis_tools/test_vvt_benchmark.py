"""The VVT benchmark tool: its memory tracker and its (deterministic) memory scaling."""
import json
from pathlib import Path

import pytest
import torch
from tool_test_utils import load_tool

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope='module')
def bench():
    return load_tool('analysis_tools/benchmark_vicinity_attention.py')


def test_peak_memory_tracker_counts_live_allocations(bench):
    x = torch.randn(256, 1024)  # 1 MiB, allocated before tracking: not counted
    with bench.TensorPeakMemory() as tracker:
        doubled = x * 2  # +1 MiB
        view = doubled.view(-1)  # a view: nothing new
        doubled.add_(1)  # in place: nothing new
        del doubled, view  # -1 MiB
        summed = x + x  # +1 MiB
        stacked = torch.cat([x, summed])  # +2 MiB -> peak 3 MiB
    assert tracker.peak == 3 * 2**20
    assert tracker.live == 3 * 2**20
    del summed, stacked
    assert tracker.live == 0


def test_vicinity_memory_grows_linearly_softmax_quadratically(bench, tmp_path):
    out_json, out_csv = tmp_path / 'bench.json', tmp_path / 'bench.csv'
    rows = bench.main([
        '--sides', '16', '32', '--dim', '32', '--batch', '1', '--warmup', '0', '--repeat', '1',
        '--arch', 'tiny', '--sizes', '32', '--out-json', str(out_json), '--out-csv',
        str(out_csv)
    ])
    growth = {row['method']: row['memory_growth'] for row in rows if 'memory_growth' in row}
    assert growth['vicinity'] <= 4.5
    assert growth['softmax'] >= 8
    assert [row['part'] for row in rows] == ['attention'] * 4 + ['backbone']
    saved = json.loads(out_json.read_text())
    assert saved['environment']['amp'] is False and len(saved['rows']) == 5
    assert len(out_csv.read_text().splitlines()) == 6


def test_sizes_are_timed_in_turns_and_growth_is_paired_per_round(bench):
    clock, calls = [0.0], []

    def make_step(name, cost):

        def step():
            calls.append(name)
            clock[0] += cost * (1 + (len(calls) - 1) // 2)  # the machine slows every round

        return step

    times = bench.interleaved_ms([make_step('small', 1), make_step('large', 4)],
                                 torch.device('cpu'), warmup=1, repeat=4, clock=lambda: clock[0])
    assert calls == ['small', 'large'] + ['small', 'large', 'large', 'small'] * 2
    assert times == [[2000, 3000, 4000, 5000], [8000, 12000, 16000, 20000]]
    assert all(large / small == 4 for small, large in zip(*times))
