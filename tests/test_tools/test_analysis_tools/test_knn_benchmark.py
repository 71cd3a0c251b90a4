"""The k-NN attention benchmark's interleaved comparison: cases, passes, ratios, checks."""
import json
import statistics

import torch
from tool_test_utils import load_tool


def test_interleaved_comparison_reports_every_case(tmp_path):
    bench = load_tool('analysis_tools/benchmark_knn_attention.py')
    out = tmp_path / 'knn'
    bench.main(['--interleaved', '--sizes', '16', '24', '--topks', '0.5', '3', '--dim', '8',
                '--batch-at', '24:1', '--rounds', '2', '--rounds-at', '24:3', '--out',
                str(out)])
    rows = json.loads((tmp_path / 'knn.json').read_text())['results']
    cases = [(row['n'], row['batch'], row['topk'], row['pass_'], row['rounds']) for row in rows]
    assert cases == [(n, batch, k, kind, rounds)
                     for n, batch, rounds in ((16, 2, 2), (24, 1, 3))
                     for k in (n // 2, 3)
                     for kind in ('forward', 'forward+backward')]
    for row in rows:
        assert {name: len(times) for name, times in row['round_ms'].items()} == dict.fromkeys(
            ('knn', 'sdpa', 'mask_scatter', 'selection_floor'), row['rounds'])
        knn, sdpa = row['round_ms']['knn'], row['round_ms']['sdpa']
        floor = row['round_ms']['selection_floor']
        assert row['knn_over_sdpa'] == statistics.median(a / b for a, b in zip(knn, sdpa))
        assert row['selection_floor_over_sdpa'] == statistics.median(
            a / b for a, b in zip(floor, sdpa))
        assert row['mask_scatter_over_knn'] > 0
        # Ours and the authors' compute the same float32 function on untied random inputs.
        assert row['max_abs_diff_out'] < 1e-5 and row['max_abs_diff_grad'] < 1e-5


def test_selection_floor_is_the_k_th_largest_logit_of_every_row():
    bench = load_tool('analysis_tools/benchmark_knn_attention.py')
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 10, 4, generator=generator) for _ in range(3))
    logits = query @ key.transpose(-2, -1) * 4**-0.5
    expected = logits.sort(dim=-1, descending=True).values[..., 2]
    for chunk_size in (None, 3):
        thresholds = bench.selection_floor(query, key, value, 3, chunk_size=chunk_size)
        torch.testing.assert_close(thresholds, expected)
