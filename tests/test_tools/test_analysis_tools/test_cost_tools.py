"""The cost tools (get_flops, benchmark, complexity_curve) on tiny models."""
import csv
import json
import os.path as osp

import pytest
import tool_test_utils
import torch

from measure import (benchmark, build_model, count_parameters, load_model_spec, measure_complexity,
                     select_backbone)
from measure.benchmark import BenchmarkCase, measure_case, measure_interleaved, paired_time_ratio

TOOLS = osp.join(osp.dirname(__file__), '..', '..', '..', 'tools', 'analysis_tools')

TINY_SWIN = ("dict(type='mmdet.SwinTransformer', embed_dims=16, depths=(1, 1, 1, 1), "
             'num_heads=(1, 1, 1, 1), window_size=4, mlp_ratio=2)')
TINY_RESNET = "dict(type='mmdet.ResNet', depth=18, base_channels=8, stem_channels=8)"

TINY_SEGMENTOR = """
default_scope = 'mmseg'
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(type='SegDataPreProcessor', size=(64, 64)),
    backbone=dict(type='ResNetV1c', depth=18, stem_channels=8, base_channels=8,
                  norm_cfg=norm_cfg),
    neck=dict(type='FPN', in_channels=[8, 16, 32, 64], out_channels=16, num_outs=4),
    decode_head=dict(type='FPNHead', in_channels=[16, 16, 16, 16], in_index=[0, 1, 2, 3],
                     feature_strides=[4, 8, 16, 32], channels=16, num_classes=3,
                     norm_cfg=norm_cfg, align_corners=False,
                     loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0)),
    train_cfg=dict(), test_cfg=dict(mode='whole'))
"""

TINY_MASK_RCNN = """
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
model = dict(
    backbone=dict(depth=18, base_channels=8, stem_channels=8, init_cfg=None),
    neck=dict(in_channels=[8, 16, 32, 64], out_channels=16),
    rpn_head=dict(in_channels=16, feat_channels=16),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=16),
        bbox_head=dict(in_channels=16, fc_out_channels=32, num_classes=2),
        mask_roi_extractor=dict(out_channels=16),
        mask_head=dict(in_channels=16, conv_out_channels=16, num_classes=2)))
"""


def load_tool(name):
    """A script of tools/analysis_tools/ as a module."""
    return tool_test_utils.load_tool(f'analysis_tools/{name}.py')


def write_config(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_get_flops_backbone_spec_scales_and_writes_json(tmp_path):
    get_flops = load_tool('get_flops')
    results = {}
    for size in (128, 256):
        out = tmp_path / f'{size}.json'
        get_flops.main(['--backbone', TINY_SWIN, '--shape', str(size), '--json', str(out)])
        results[size] = json.loads(out.read_text())
    model = build_model(*load_model_spec(backbone=TINY_SWIN))
    assert results[128]['params'] == count_parameters(model) > 0
    assert results[128]['by_op']['bmm'] > 0  # window attention products are counted
    # every stage map is a multiple of the window at both sizes: window attention, linears and
    # convs are all linear in the number of tokens
    assert results[256]['flops'] == 4 * results[128]['flops']


def test_get_flops_segmentor_config_and_backbone_only(tmp_path, capsys):
    config = write_config(tmp_path, 'tiny_fpn.py', TINY_SEGMENTOR)
    model = build_model(*load_model_spec(config))
    full = measure_complexity(model, (64, 64))
    backbone = measure_complexity(select_backbone(model, True), (64, 64))
    assert full.flops > backbone.flops > 0
    assert full.module_breakdown(1)['backbone'] == backbone.flops
    assert full.params == count_parameters(model)
    load_tool('get_flops').main([config, '--shape', '64', '--backbone-only'])
    assert f'({backbone.flops:,} multiply-adds)' in capsys.readouterr().out


def test_two_stage_detector_counts_rpn_and_roi_heads_on_cpu(tmp_path):
    config = write_config(tmp_path, 'tiny_mask_rcnn.py', TINY_MASK_RCNN)
    model_cfg, scope = load_model_spec(config)
    assert scope == 'mmdet'
    model = build_model(model_cfg, scope)
    result = measure_complexity(model, (64, 96))
    # NMS in the RPN needs values: counted on a real CPU pass
    assert result.device == 'cpu'
    by_module = result.module_breakdown(1)
    assert by_module['roi_head'] > 0 and by_module['rpn_head'] > 0
    assert result.flops == sum(by_module.values())


def test_bad_model_sources_are_named(tmp_path):
    with pytest.raises(ValueError, match='nor a dict literal'):
        load_model_spec(backbone='no-such-preset')
    with pytest.raises(ValueError, match='"type" key'):
        load_model_spec(backbone="dict(arch='tiny')")
    with pytest.raises(FileNotFoundError, match='missing.py'):
        load_model_spec(str(tmp_path / 'missing.py'))
    empty = write_config(tmp_path, 'empty.py', 'x = 1\n')
    with pytest.raises(KeyError, match='empty.py'):
        load_model_spec(empty)


# name -> (our backbone's FLOPs and parameters at 224 x 224, exactly; the parameters the
# authors' ImageNet classifier has and the backbone lacks, minus the ones the backbone has and
# the classifier lacks; the authors' FLOPs (G) and parameters (M) as printed,
# ../shared/reference/PAPER_TABLES.md).
BASELINES = {
    # Head 768 x 1000 + 1000; mmdet's extra output norms norm0-norm2 are 2 x (96 + 192 + 384).
    'swin-t': (4_489_798_656, 27_520_698, 769_000 - 1_344, 4.5, 28),
    # Head 512 x 1000 + 1000; both have a norm after every stage.
    'pvtv2-b2': (4_026_222_592, 24_849_856, 513_000, 4.0, 25.4),
    # fc 2048 x 1000 + 1000.
    'resnet-50': (4_087_136_256, 23_508_032, 2_049_000, 4.1, 25.6),
}


@pytest.mark.parametrize('name', BASELINES)
def test_baselines_match_published_figures(name):
    """Exact counts, and the authors' figures at their printed precision (the classifier's
    head adds under 0.002 GFLOPs, which does not change the rounding)."""
    flops, params, classifier_only, paper_gflops, paper_mparams = BASELINES[name]
    result = measure_complexity(build_model(*load_model_spec(backbone=name)), (224, 224))
    assert (result.flops, result.params) == (flops, params)
    assert round(flops / 1e9, 1) == paper_gflops
    decimals = len(str(paper_mparams).partition('.')[2])
    assert round((params + classifier_only) / 1e6, decimals) == paper_mparams


def test_measure_case_in_process_reports_medians_and_memory():
    row = measure_case(
        BenchmarkCase(
            shape=(64, 64),
            batch_size=2,
            mode='train',
            backbone=TINY_RESNET,
            warmup=1,
            repeats=3,
            threads=1,
            timer='cpu'))
    assert row['min_ms'] <= row['median_ms'] <= row['max_ms']
    assert row['images_per_s'] == pytest.approx(2000 / row['median_ms'])
    assert row['extra_mem_mb'] > 0 and row['params'] > 0 and row['threads'] == 1
    with pytest.raises(ValueError, match='threads=1'):
        BenchmarkCase(shape=(64, 64), batch_size=1, mode='train', backbone=TINY_RESNET,
                      timer='cpu')


def interleaved_cases(**overrides):
    settings = dict(shape=(64, 64), batch_size=1, mode='inference', warmup=1, repeats=4,
                    threads=1, timer='cpu')
    return [
        BenchmarkCase(backbone=TINY_RESNET, label='resnet', **settings),
        BenchmarkCase(backbone=TINY_SWIN, label='swin', **{**settings, **overrides})
    ]


def test_measure_interleaved_alternates_and_pairs_rounds(monkeypatch):
    calls = []

    def scripted_step(prepared):
        # The machine slows down by 1 s per pass; the swin pass itself costs 1 s more.
        calls.append(prepared.case.label)
        return len(calls) + (prepared.case.label == 'swin')

    monkeypatch.setattr(benchmark._PreparedCase, 'timed_step', scripted_step)
    resnet, swin = measure_interleaved(interleaved_cases())
    assert calls == ['resnet', 'swin', 'swin', 'resnet'] * 2 + ['resnet', 'swin']
    assert resnet['round_ms'] == [4000, 5000, 8000, 9000]
    assert swin['round_ms'] == [4000, 7000, 8000, 11000]
    assert resnet['median_ms'] == 6500 and swin['median_ms'] == 7500
    assert resnet['label'] == 'resnet' and resnet['params'] < swin['params']
    assert resnet['extra_mem_mb'] > 0 and swin['extra_mem_mb'] > 0
    ratios = sorted(s / r for s, r in zip(swin['round_ms'], resnet['round_ms']))
    median, lower, upper = paired_time_ratio(swin, resnet)
    assert median == pytest.approx((ratios[1] + ratios[2]) / 2)
    assert ratios[0] <= lower <= median <= upper <= ratios[-1]


def test_measure_interleaved_times_real_models():
    resnet, swin = measure_interleaved(interleaved_cases())
    for row in (resnet, swin):
        assert len(row['round_ms']) == 4 and all(value > 0 for value in row['round_ms'])
        assert row['median_ms'] == pytest.approx(
            (sorted(row['round_ms'])[1] + sorted(row['round_ms'])[2]) / 2)


def test_measure_interleaved_needs_comparable_cases():
    with pytest.raises(ValueError, match=r"share \['shape', 'mode'\]"):
        measure_interleaved(interleaved_cases(shape=(32, 32), mode='train'))
    with pytest.raises(ValueError, match='at least two cases'):
        measure_interleaved(interleaved_cases()[:1])


def test_benchmark_tool_runs_cases_in_subprocesses(tmp_path):
    out = str(tmp_path / 'bench')
    config = write_config(tmp_path, 'seg.py', TINY_SEGMENTOR)
    rows = load_tool('benchmark').main([
        config, '--backbone', TINY_RESNET, '--shape', '64x96', '--modes', 'inference',
        '--warmup', '1', '--repeats', '2', '--threads', '1', '--out', out
    ])
    assert [(row['label'], row['height'], row['width'], row['error']) for row in rows] == [
        (config, 64, 96, ''), (TINY_RESNET, 64, 96, '')]
    assert all(row['median_ms'] > 0 for row in rows)
    assert rows[0]['params'] > rows[1]['params']  # the segmentor adds neck and head
    with open(out + '.csv') as file:
        assert [float(row['median_ms']) for row in csv.DictReader(file)] == [
            row['median_ms'] for row in rows]
    with open(out + '.json') as file:
        assert json.load(file) == rows
    with pytest.raises(SystemExit):
        load_tool('benchmark').main([config, '--backbone', TINY_RESNET, '--label', 'one'])


def test_complexity_curve_flops_only(tmp_path):
    load_tool('complexity_curve').main([
        '--models', TINY_RESNET, TINY_SWIN, '--sizes', '128', '64', '--flops-only', '--out-dir',
        str(tmp_path)
    ])
    with open(tmp_path / 'flops.csv') as file:
        flops = list(csv.DictReader(file))
    resnet = [row for row in flops if row['model'] == TINY_RESNET]
    assert [int(row['size']) for row in resnet] == [64, 128]
    # Exactly: every ResNet layer's output is twice as high and wide at 128 as at 64.
    assert float(resnet[1]['relative_to_smallest']) == 4
    assert len(flops) == 4 and not (tmp_path / 'measured.csv').exists()
    for name in ('flops.png', 'flops_relative.png'):
        assert (tmp_path / name).stat().st_size > 1000


def test_deform_conv_benchmark_compares_both_kernels_at_lit_sizes(tmp_path):
    pytest.importorskip('mmcv.ops')
    out = tmp_path / 'deform_conv.json'
    rows = load_tool('benchmark_deform_conv').main(
        ['--arch', 'tiny', '--size', '64', '--warmup', '0', '--rounds', '2', '--out-json',
         str(out)])
    # LIT-Ti has three DTMs; each in two modes, then one total per mode
    assert [row['dtm'] for row in rows[:2]] == ['64->128 on 16x16'] * 2
    assert [row['dtm'] for row in rows[-2:]] == ['all DTMs'] * 2 and len(rows) == 8
    assert all(row['ratio'] > 0 and row['mmcv_ms'] > 0 for row in rows)
    # The kernels differ by rounding only: within 64 float32 eps (7.6e-6) of the largest value
    # (measured and bounded in test_dtm.py), while a wrong kernel differs by 1e-2 or more.
    rounding = 64 * torch.finfo(torch.float32).eps
    assert all(row['output'] <= rounding and row['grad_offset'] <= rounding for row in rows[:-2])
    assert json.loads(out.read_text())['rows'] == rows


@pytest.mark.slow
def test_complexity_curve_measured(tmp_path):
    load_tool('complexity_curve').main([
        '--models', TINY_RESNET, '--sizes', '64', '--repeats', '1', '--warmup', '0',
        '--threads', '1', '--out-dir',
        str(tmp_path)
    ])
    with open(tmp_path / 'measured.csv') as file:
        measured = list(csv.DictReader(file))
    assert len(measured) == 1 and float(measured[0]['median_ms']) > 0
    for name in ('latency.png', 'memory.png'):
        assert (tmp_path / name).stat().st_size > 1000
