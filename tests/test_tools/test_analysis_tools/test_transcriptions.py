"""Plain transcriptions: the same function as our backbones, the baseline of the speed target."""
import csv
import json

import pytest
import torch
from test_cost_tools import load_tool

from measure.benchmark import BenchmarkCase, measure_case
from measure.pairs import TRANSCRIBED, build_pair
from mmsparsevit.models.layers.knn_attention import knn_attention
from transcriptions import mask_scatter_knn_attention, plain_knn_backbone


@pytest.mark.parametrize('name', ['vvt-t', 'lit-ti', 'lit-s', 'kvt-swin-t', 'kvt-pvtv2-b2'])
def test_ours_and_transcription_compute_the_same_function(name):
    torch.manual_seed(0)
    ours, plain = (model.double() for model in build_pair(name))
    assert ours is not plain
    images = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        ours_outs, plain_outs = ours(images), plain(images)
    assert [out.shape for out in ours_outs] == [out.shape for out in plain_outs]
    for out, ref in zip(ours_outs, plain_outs):
        assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-12


def test_transcription_is_not_our_code():
    ours, plain = build_pair('lit-s')
    our_modules = {type(module).__module__ for module in ours.modules()}
    plain_modules = {type(module).__module__ for module in plain.modules()}
    assert not any(name.startswith('mmsparsevit.models') for name in plain_modules)
    assert any(name.startswith('mmsparsevit.models') for name in our_modules)


def test_mask_scatter_equals_knn_attention_with_forbidden_keys():
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 3, 20, 8, generator=generator, dtype=torch.float64)
                         for _ in range(3))
    allowed = torch.rand(20, 20, generator=generator) > 0.4
    allowed.fill_diagonal_(True)
    logits = (query * 8**-0.5) @ key.transpose(-2, -1)
    logits = logits.masked_fill(~allowed, float('-inf'))
    for topk in (1, 7, 20):
        expected = knn_attention(query, key, value, topk, attn_mask=allowed)
        actual = mask_scatter_knn_attention(logits, value, topk)
        # Float64, the same keys, summed in another order (measured 8e-16).
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_plain_knn_backbone_needs_knn_attention_modules():
    with pytest.raises(TypeError, match='no k-NN attention module.*mmsparsevit.KVT'):
        plain_knn_backbone(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_build_pair_names_the_transcribed_presets():
    with pytest.raises(KeyError, match="no plain transcription of 'swin-t'.*vvt-s"):
        build_pair('swin-t')
    assert {'vvt-s', 'lit-s', 'kvt-swin-t'} <= set(TRANSCRIBED)


def test_benchmark_case_measures_either_implementation():
    rows = {
        implementation: measure_case(
            BenchmarkCase(
                shape=(64, 64),
                batch_size=1,
                mode='inference',
                backbone='vvt-t',
                implementation=implementation,
                warmup=0,
                repeats=1,
                threads=1))
        for implementation in ('ours', 'plain')
    }
    # The transcription keeps the authors' 1000-class head (512 x 1000 + 1000).
    assert rows['ours']['params'] == 12_369_440
    assert rows['plain']['params'] == 12_369_440 + 513_000
    assert all(row['median_ms'] > 0 for row in rows.values())
    with pytest.raises(ValueError, match="implementation must be one of.*'fast'"):
        BenchmarkCase(shape=(64, 64), batch_size=1, mode='inference', backbone='vvt-t',
                      implementation='fast')
    with pytest.raises(ValueError, match='needs a backbone preset'):
        BenchmarkCase(shape=(64, 64), batch_size=1, mode='inference', config='x.py',
                      implementation='ours')


@pytest.mark.slow
def test_benchmark_targets_tool_reports_every_target(tmp_path):
    results = load_tool('benchmark_targets').main([
        '--sides', '8', '16', '--knn-size', '64', '--backbones', 'vvt-t', '--sizes', '64',
        '--train-sizes', '--warmup', '0', '--repeats', '1', '--out-dir',
        str(tmp_path)
    ])
    targets = [row['target'] for row in results]
    assert targets[0].startswith('vicinity attention, 64 -> 256 tokens')
    assert targets[1].startswith('k-NN attention at N = 64, k = 32')
    assert targets[2].startswith('vvt-t, inference 64²')
    assert len(results) == 3 and all(isinstance(row['met'], bool) for row in results)
    assert results[2]['met'] == (results[2]['time_ratio'] <= 1.10)
    with open(tmp_path / 'backbones.csv') as file:
        rows = list(csv.DictReader(file))
    assert [row['implementation'] for row in rows] == ['ours', 'plain']
    assert all(len(row['round_ms'].split()) == 1 for row in rows)
    assert all(float(row['max_relative_error']) < 1e-12 for row in rows)
    table = (tmp_path / 'targets.md').read_text()
    assert table.count('\n| ') == 4 and '| target | measured | met? |' in table
    with open(tmp_path / 'targets.json') as file:
        assert json.load(file)['environment']['threads'] == 1
