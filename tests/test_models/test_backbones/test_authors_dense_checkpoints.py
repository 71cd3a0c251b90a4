# Copyright (c) mmsparsevit contributors. All rights reserved.
"""The LIT authors' trained detectors and segmentors load into our configs' models.

zhuang-group/LIT released RetinaNet and Mask R-CNN models (COCO) trained with their vendored
mmdet 2.11 and Semantic FPN models (ADE20K) trained with their mmseg 0.13. The state dicts here
have those files' layout: the backbone part is the official layout of their ``LIT_Ti`` / ``LIT``
dense backbones (``PlainLITTi`` / ``PlainLIT``, with the detection and segmentation variants'
table sizes and output norms), the neck and head part comes from the tables below, written from
the vendored 2.11 / 0.13 modules (not from our mmdet 3 / mmseg 1 models, which would make the
check circular). Each is wrapped as the authors' runners saved it (mmcv 1.x ``meta``,
``state_dict``, ``optimizer``; the Swin-style runner of the LIT-S detectors also stores
``amp``).

Shapes are checked on the meta device; only the spot-checked tensors hold values, and only the
converter tool's round trip writes real (zero-filled) files.
"""
import ast
import functools
import importlib
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner import Runner
from mmengine.runner.checkpoint import CheckpointLoader
from tool_test_utils import load_tool

from mmsparsevit.models import convert_dense_checkpoint
from mmsparsevit.models.backbones import VVT
from mmsparsevit.runtime import harden_test_config
from mmsparsevit.utils.state_dict import match_state_dict
from transcriptions import PlainLIT, PlainLITTi, PlainVVT

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / 'configs'
MODULE_FILE = REPO / 'mmsparsevit' / 'models' / 'dense_checkpoint.py'

Entries = List[Tuple[str, tuple, torch.dtype]]


# --- The authors' neck and head layouts (mmdet 2.11 / mmseg 0.13), from the vendored code. ---

def _conv(name: str, cout: int, cin: int, kernel: int, bias: bool = True) -> Entries:
    entries = [(f'{name}.weight', (cout, cin, kernel, kernel), torch.float32)]
    return entries + ([(f'{name}.bias', (cout, ), torch.float32)] if bias else [])


def _linear(name: str, cout: int, cin: int) -> Entries:
    return [(f'{name}.weight', (cout, cin), torch.float32),
            (f'{name}.bias', (cout, ), torch.float32)]


def _batch_norm(name: str, channels: int) -> Entries:
    return [(f'{name}.{p}', (channels, ), torch.float32)
            for p in ('weight', 'bias', 'running_mean', 'running_var')] + [
                (f'{name}.num_batches_tracked', (), torch.int64)]


def _fpn_neck(in_channels: Tuple[int, ...], start_level: int, num_outs: int,
              extra_on_input: bool) -> Entries:
    """necks/fpn.py: a norm-free ConvModule (``.conv``, with bias) per lateral and per output;
    ``add_extra_convs='on_input'`` appends stride-2 convs to ``fpn_convs``, the first one on
    the last backbone map."""
    levels = in_channels[start_level:]
    entries: Entries = []
    for index, channels in enumerate(levels):
        entries += _conv(f'neck.lateral_convs.{index}.conv', 256, channels, 1)
    for index in range(len(levels)):
        entries += _conv(f'neck.fpn_convs.{index}.conv', 256, 256, 3)
    if extra_on_input:
        for extra in range(num_outs - len(levels)):
            cin = in_channels[-1] if extra == 0 else 256
            entries += _conv(f'neck.fpn_convs.{len(levels) + extra}.conv', 256, cin, 3)
    return entries


def _retina_head() -> Entries:
    """dense_heads/retina_head.py: 4 + 4 stacked ConvModules, 9 anchors, 80 sigmoid classes."""
    entries: Entries = []
    for branch in ('cls_convs', 'reg_convs'):
        for index in range(4):
            entries += _conv(f'bbox_head.{branch}.{index}.conv', 256, 256, 3)
    return entries + _conv('bbox_head.retina_cls', 9 * 80, 256, 3) + _conv(
        'bbox_head.retina_reg', 9 * 4, 256, 3)


def _rpn_and_roi_heads() -> Entries:
    """dense_heads/rpn_head.py (3 anchors, 1 sigmoid class); roi_heads: Shared2FCBBoxHead
    (7x7x256 RoI features, 80 classes + background, class-specific boxes) and FCNMaskHead
    (4 ConvModules, a 2x deconv, 80 mask logits)."""
    entries = (_conv('rpn_head.rpn_conv', 256, 256, 3) + _conv('rpn_head.rpn_cls', 3, 256, 1) +
               _conv('rpn_head.rpn_reg', 3 * 4, 256, 1))
    entries += _linear('roi_head.bbox_head.shared_fcs.0', 1024, 256 * 7 * 7)
    entries += _linear('roi_head.bbox_head.shared_fcs.1', 1024, 1024)
    entries += _linear('roi_head.bbox_head.fc_cls', 80 + 1, 1024)
    entries += _linear('roi_head.bbox_head.fc_reg', 4 * 80, 1024)
    for index in range(4):
        entries += _conv(f'roi_head.mask_head.convs.{index}.conv', 256, 256, 3)
    # nn.ConvTranspose2d keeps its weight as (in, out, k, k).
    entries += [('roi_head.mask_head.upsample.weight', (256, 256, 2, 2), torch.float32),
                ('roi_head.mask_head.upsample.bias', (256, ), torch.float32)]
    return entries + _conv('roi_head.mask_head.conv_logits', 80, 256, 1)


def _fpn_decode_head() -> Entries:
    """decode_heads/decode_head.py + fpn_head.py: ``conv_seg`` (150 ADE20K classes) from the
    base class, then per stride 4/8/16/32 a Sequential of 1/1/2/3 ConvModules (3x3, SyncBN, so
    no conv bias), each but stride 4's followed by a parameter-free 2x upsample."""
    entries = _conv('decode_head.conv_seg', 150, 128, 1)
    for scale, length in enumerate((1, 1, 2, 3)):
        for step in range(length):
            index = 2 * step if scale > 0 else step
            prefix = f'decode_head.scale_heads.{scale}.{index}'
            entries += _conv(f'{prefix}.conv', 128, 256 if step == 0 else 128, 3, bias=False)
            entries += _batch_norm(f'{prefix}.bn', 128)
    return entries


NECK_AND_HEADS: Dict[str, Callable[[Tuple[int, ...]], Entries]] = {
    # retinanet_lit_*_fpn_1x_coco.py: FPN(start_level=1, add_extra_convs='on_input', 5 outs)
    'retinanet': lambda chans: _fpn_neck(chans, 1, 5, True) + _retina_head(),
    # mask_rcnn_lit_*_fpn_1x_coco.py: FPN(5 outs, the fifth by max pooling)
    'mask_rcnn': lambda chans: _fpn_neck(chans, 0, 5, False) + _rpn_and_roi_heads(),
    # lit_*_fpn_r50_512x512_80k_ade20k.py: FPN(4 outs) + FPNHead(channels=128)
    'sem_fpn': lambda chans: _fpn_neck(chans, 0, 4, False) + _fpn_decode_head(),
}
TINY_CHANNELS = (64, 128, 320, 512)
SMALL_CHANNELS = (96, 192, 384, 768)


class Case(NamedTuple):
    config: str  # under configs/
    release: str  # file name of the authors' release
    task: str  # key of NECK_AND_HEADS
    arch: str  # 'tiny' or 'small'
    table_img: int = 0  # LIT-S: the input size the relative-position tables are made for
    norm_indices: Tuple[int, ...] = ()  # LIT-S: stages with an output norm
    amp: bool = False  # saved by their EpochBasedRunnerAmp
    published_params: int = 0  # millions, the authors' README


CASES = {
    'retinanet_lit-ti': Case('retinanet/retinanet_lit-ti_fpn_1x_coco.py', 'retina_lit_ti.pth',
                             'retinanet', 'tiny', published_params=30),
    'retinanet_lit-s': Case('retinanet/retinanet_lit-s_fpn_1x_coco.py', 'retina_lit_s.pth',
                            'retinanet', 'small', 800, (1, 2, 3), amp=True, published_params=39),
    'mask-rcnn_lit-ti': Case('mask_rcnn/mask-rcnn_lit-ti_fpn_1x_coco.py', 'mask_rcnn_lit_ti.pth',
                             'mask_rcnn', 'tiny', published_params=40),
    'mask-rcnn_lit-s': Case('mask_rcnn/mask-rcnn_lit-s_fpn_1x_coco.py', 'mask_rcnn_lit_s.pth',
                            'mask_rcnn', 'small', 800, (1, 2, 3), amp=True, published_params=48),
    # Their mmseg LIT norms all four outputs; the tables are made for 512-pixel inputs.
    'fpn_lit-ti': Case('fpn/fpn_lit-ti_4xb4-80k_ade20k-512x512.py', 'sem_fpn_lit_ti.pth',
                       'sem_fpn', 'tiny', published_params=24),
    'fpn_lit-s': Case('fpn/fpn_lit-s_4xb4-80k_ade20k-512x512.py', 'sem_fpn_lit_s.pth', 'sem_fpn',
                      'small', 512, (0, 1, 2, 3), published_params=32),
}


def _authors_backbone(case: Case) -> torch.nn.Module:
    if case.arch == 'tiny':
        # Their LIT_Ti (detection and segmentation alike) keeps img_size=224: position
        # embeddings of 56^2, 28^2, 14^2 and 7^2 + 1 (class-token row) tokens.
        return PlainLITTi('tiny', img=224)
    return PlainLIT('small', table_img=case.table_img, norm_indices=case.norm_indices)


def authors_state_dict(case: Case) -> 'OrderedDict[str, torch.Tensor]':
    """The state dict of the authors' release, on the meta device, in their key order."""
    with torch.device('meta'):
        backbone = _authors_backbone(case)
    state_dict = OrderedDict(
        (f'backbone.{key}', value) for key, value in backbone.state_dict().items())
    channels = TINY_CHANNELS if case.arch == 'tiny' else SMALL_CHANNELS
    for key, shape, dtype in NECK_AND_HEADS[case.task](channels):
        state_dict[key] = torch.empty(shape, dtype=dtype, device='meta')
    return state_dict


def authors_file(state_dict: dict, case: Case) -> dict:
    """Wrapped as their mmcv 1.x runners save it."""
    meta = dict(mmcv_version='1.3.1', time='Mon May 31 10:00:00 2021', config='# their config',
                env_info='sys.platform: linux', seed=0, exp_name=Path(case.config).stem)
    if case.task == 'sem_fpn':
        meta.update(mmseg_version='0.13.0+unknown', iter=80000, epoch=1,
                    CLASSES=tuple(f'ade_class_{i}' for i in range(150)),
                    PALETTE=[[i, i, i] for i in range(150)])
    else:
        meta.update(mmdet_version='2.11.0', epoch=12, iter=87960,
                    CLASSES=tuple(f'coco_class_{i}' for i in range(80)))
    checkpoint = {
        'meta': meta,
        'state_dict': state_dict,
        'optimizer': {
            'state': {0: {'step': 87960, 'exp_avg': torch.zeros(2),
                          'exp_avg_sq': torch.zeros(2)}},
            'param_groups': [{'lr': 1e-6, 'betas': (0.9, 0.999), 'eps': 1e-8,
                              'weight_decay': 1e-4, 'amsgrad': False, 'params': [0]}],
        },
    }
    if case.amp:
        checkpoint['amp'] = {'loss_scaler0': {'loss_scale': 1024.0, 'unskipped': 113}}
    return checkpoint


# --- Where the authors' tensors must land: (their key, our key, their tensor -> ours). ---

def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _tiny_pos_embed4(tensor: torch.Tensor) -> torch.Tensor:
    # Their _get_pos_embed: drop the class-token row, view the 7x7 grid, channels first.
    return tensor[:, 1:].reshape(1, 7, 7, -1).permute(0, 3, 1, 2)


SPOT_CHECKS = {
    'tiny': [
        ('backbone.patch_embed3.dconv.conv_offset.weight',
         'backbone.stages.2.downsample.conv_offset.weight', _same),
        ('backbone.patch_embed2.norm_layer.running_var',
         'backbone.stages.1.downsample.norm.running_var', _same),
        ('backbone.block1.2.norm2.weight', 'backbone.stages.0.blocks.2.norm.weight', _same),
        ('backbone.block3.5.attn.qkv.weight', 'backbone.stages.2.blocks.5.attn.qkv.weight',
         _same),
        ('backbone.pos_embed4', 'backbone.stages.3.pos_embed', _tiny_pos_embed4),
    ],
    'small': [
        ('backbone.layers.1.downsample.dconv.conv_offset.weight',
         'backbone.stages.2.downsample.conv_offset.weight', _same),
        ('backbone.layers.0.downsample.norm_layer.running_mean',
         'backbone.stages.1.downsample.norm.running_mean', _same),
        ('backbone.layers.0.blocks.1.mlp.fc1.weight',
         'backbone.stages.0.blocks.1.ffn.layers.0.0.weight', _same),
        ('backbone.layers.2.blocks.3.attn.relative_position_bias_table',
         'backbone.stages.2.blocks.3.attn.relative_position_bias_table', _same),
        ('backbone.norm3.bias', 'backbone.norm3.bias', _same),
    ],
    'retinanet': ['neck.fpn_convs.3.conv.weight', 'bbox_head.retina_cls.weight',
                  'bbox_head.reg_convs.2.conv.bias'],
    'mask_rcnn': ['neck.lateral_convs.0.conv.weight', 'rpn_head.rpn_reg.weight',
                  'roi_head.bbox_head.fc_reg.weight', 'roi_head.mask_head.upsample.weight'],
    'sem_fpn': ['neck.lateral_convs.3.conv.weight', 'decode_head.scale_heads.3.4.bn.running_var',
                'decode_head.conv_seg.weight'],
}


def spot_checks(case: Case) -> List[Tuple[str, str, Callable]]:
    checks = list(SPOT_CHECKS[case.arch])
    if 0 in case.norm_indices:
        checks.append(('backbone.norm0.weight', 'backbone.norm0.weight', _same))
    return checks + [(key, key, _same) for key in SPOT_CHECKS[case.task]]


def with_values(state_dict: dict, keys, seed: int = 0) -> 'OrderedDict[str, torch.Tensor]':
    """A copy whose ``keys`` hold seeded random values (materialised on the CPU)."""
    generator = torch.Generator().manual_seed(seed)
    result = OrderedDict(state_dict)
    for key in keys:
        result[key] = torch.randn(state_dict[key].shape, generator=generator)
    return result


def materialised(state_dict: dict) -> 'OrderedDict[str, torch.Tensor]':
    """Meta tensors replaced by zeros of their shape and dtype (real tensors kept)."""
    return OrderedDict(
        (key, torch.zeros(value.shape, dtype=value.dtype) if value.is_meta else value)
        for key, value in state_dict.items())


# --- Our models, as the configs build them. ---

@functools.lru_cache(maxsize=None)
def _config(config: str, pretrain_img_size: Optional[int] = None) -> Config:
    cfg = Config.fromfile(str(CONFIGS / config))
    if pretrain_img_size is not None:
        cfg.model.backbone.pretrain_img_size = pretrain_img_size
    return cfg


def build_model(config: str, device: str = 'meta',
                pretrain_img_size: Optional[int] = None) -> torch.nn.Module:
    cfg = _config(config, pretrain_img_size)
    init_default_scope(cfg.default_scope)
    registry = importlib.import_module(f'{cfg.default_scope}.registry').MODELS
    with torch.device(device):
        return registry.build(cfg.model)


@functools.lru_cache(maxsize=None)
def meta_model(config: str, pretrain_img_size: Optional[int] = None) -> torch.nn.Module:
    return build_model(config, 'meta', pretrain_img_size)


@functools.lru_cache(maxsize=None)
def converted_case(name: str):
    """(source state dict, converted state dict, notes, model) of one release."""
    case = CASES[name]
    source = with_values(authors_state_dict(case), [src for src, _, _ in spot_checks(case)])
    model = meta_model(case.config)
    converted, notes = convert_dense_checkpoint(authors_file(source, case), model)
    return source, converted, notes, model


def load_converter():
    return load_tool('model_converters/lit_dense2mmsparsevit.py')


# --- Tests. ---

@pytest.mark.parametrize('name', sorted(CASES))
def test_authors_layout_has_the_published_size(name):
    """The tables above (and the backbone transcriptions) count the authors' README figure."""
    source = authors_state_dict(CASES[name])
    params = sum(value.numel() for key, value in source.items()
                 if value.is_floating_point() and 'running_' not in key)
    assert round(params / 1e6) == CASES[name].published_params


@pytest.mark.parametrize('name', sorted(CASES))
def test_every_model_key_is_covered_with_its_shape(name):
    _, converted, _, model = converted_case(name)
    match = match_state_dict(model.state_dict(), converted)
    assert match.exact, match.describe()


@pytest.mark.parametrize('name', sorted(CASES))
def test_every_source_key_is_carried_over_or_explained(name):
    source, converted, notes, _ = converted_case(name)
    case = CASES[name]
    # Neck and heads: the layouts agree, so each tensor keeps its key (and is not copied).
    for key, value in source.items():
        if not key.startswith('backbone.'):
            assert converted[key] is value, key
    # Backbone: renamed one to one; what is left out is in the notes, with its reason. With
    # the shipped configs the authors' tables already have the model's size: nothing resized.
    if case.arch == 'tiny':
        assert notes == {'backbone.pos_embed4[:, 0]':
                         'class-token position, unused by dense prediction'}
        left_out = 512  # one row of pos_embed4
    else:
        assert notes == {}
        left_out = 0
    ours = [key for key in converted if key.startswith('backbone.')]
    theirs = [key for key in source if key.startswith('backbone.')]
    assert len(ours) == len(theirs)
    assert (sum(source[key].numel() for key in theirs) - left_out == sum(
        converted[key].numel() for key in ours))


@pytest.mark.parametrize('name', sorted(CASES))
def test_values_land_where_they_should(name):
    source, converted, _, _ = converted_case(name)
    for theirs, ours, expected in spot_checks(CASES[name]):
        assert torch.equal(converted[ours], expected(source[theirs])), (theirs, ours)


def test_tables_are_resized_to_the_configs_input_size():
    """The authors' COCO LIT-S tables (800-pixel layout) into a model laid out for 640."""
    case = CASES['retinanet_lit-s']
    tables = {2: 50, 3: 25}  # stage -> side of the authors' 800-pixel grid
    keys = [f'backbone.layers.{stage}.blocks.{block}.attn.relative_position_bias_table'
            for stage, depth in ((2, 6), (3, 2)) for block in range(depth)]
    source = with_values(authors_state_dict(case), keys)
    model = meta_model(case.config, pretrain_img_size=640)
    converted, notes = convert_dense_checkpoint(authors_file(source, case), model)
    assert match_state_dict(model.state_dict(), converted).exact
    assert len(notes) == len(keys)
    for key in keys:
        stage = int(key.split('.')[2])
        ours = key.replace('layers.', 'stages.')
        side = 2 * tables[stage] - 1
        new_side = 2 * (640 // 4 // 2**stage) - 1
        heads = 12 if stage == 2 else 24
        assert converted[ours].shape == (new_side**2, heads)
        assert notes[ours].startswith(f'resized {(side**2, heads)} -> {(new_side**2, heads)} '
                                      '(bicubic)')
        # Odd-to-odd bicubic resizing keeps the zero-displacement (centre) entry, bitwise: it
        # samples the source exactly at a grid point, where the cubic kernel's weights are
        # 1 and 0.
        centre, new_centre = side // 2, new_side // 2
        torch.testing.assert_close(converted[ours][new_centre * new_side + new_centre],
                                   source[key][centre * side + centre],
                                   rtol=0, atol=0)


@pytest.mark.parametrize('name', ['retinanet_lit-ti', 'fpn_lit-s'])
def test_our_layout_comes_back_unchanged(name):
    model = meta_model(CASES[name].config)
    ours = model.state_dict()
    checkpoint = {'meta': {'mmdet_version': '3.3.0', 'epoch': 12}, 'state_dict': ours,
                  'message_hub': {}, 'optimizer': {}}
    converted, notes = convert_dense_checkpoint(checkpoint, model)
    assert notes == {}
    assert list(converted) == list(ours)
    assert all(converted[key] is value for key, value in ours.items())


def test_vvt_detectors_convert_through_the_vvt_converter():
    model = meta_model('retinanet/retinanet_vvt-t_fpn_1x_coco.py')
    ours = model.state_dict()
    converted, notes = convert_dense_checkpoint({'state_dict': ours}, model)
    assert notes == {} and list(converted) == list(ours)
    with torch.device('meta'):
        official = PlainVVT(**VVT.arch_zoo['tiny'])
    source = OrderedDict(
        (f'backbone.{key}', value) for key, value in official.state_dict().items())
    source.update((key, value) for key, value in ours.items() if not key.startswith('backbone.'))
    converted, notes = convert_dense_checkpoint({'state_dict': source}, model)
    assert match_state_dict(ours, converted).exact
    assert notes == {'backbone.head.weight': 'classification head',
                     'backbone.head.bias': 'classification head'}


def test_a_foreign_whole_model_is_refused_by_name():
    lit = meta_model(CASES['retinanet_lit-ti'].config)
    vvt_detector = meta_model('retinanet/retinanet_vvt-t_fpn_1x_coco.py').state_dict()
    with pytest.raises(ValueError, match=r"do not convert to the model's LIT backbone .*"
                       r'not a LIT checkpoint.*stages\.0\.patch_embed\.projection\.weight'):
        convert_dense_checkpoint({'state_dict': vvt_detector}, lit)
    # The authors' VVT layout looks like LIT-Ti's at first (patch_embed1.proj): the keys that
    # find no place are named, the first of them only.
    with torch.device('meta'):
        official = PlainVVT(**VVT.arch_zoo['tiny'])
    source = {f'backbone.{key}': value for key, value in official.state_dict().items()}
    with pytest.raises(ValueError, match=r'unrecognised LIT checkpoint keys: '
                       r"\['block1\.0\.attn\.q_proj\.weight'") as raised:
        convert_dense_checkpoint(source, lit)
    assert len(str(raised.value)) < 1000


@pytest.fixture(scope='module')
def authors_files(tmp_path_factory):
    """Real (zero-filled, spot-checked keys random) release files of two of the models."""
    root = tmp_path_factory.mktemp('authors')
    files = {}
    for name in ('retinanet_lit-s', 'fpn_lit-ti'):
        case = CASES[name]
        source = materialised(
            with_values(authors_state_dict(case), [src for src, _, _ in spot_checks(case)]))
        path = root / case.release
        torch.save(authors_file(source, case), path)
        files[name] = path, source
    return files


@pytest.mark.parametrize('name', ['retinanet_lit-s', 'fpn_lit-ti'])
def test_tool_writes_a_file_that_loads_strictly(name, authors_files, tmp_path, capsys):
    case = CASES[name]
    src, source = authors_files[name]
    dst = tmp_path / 'converted' / f'{Path(case.config).stem}.pth'
    load_converter().main([str(CONFIGS / case.config), str(src), str(dst)])
    lines = capsys.readouterr().out.splitlines()
    notes = 1 if case.arch == 'tiny' else 0
    assert lines[0].startswith(f'{src} -> {dst}: {len(source)} tensors (')
    assert lines[0].endswith(f'values), {notes} notes')
    assert len(lines) == 1 + notes

    written = CheckpointLoader.load_checkpoint(str(dst), map_location='cpu')
    scope = 'mmseg' if case.task == 'sem_fpn' else 'mmdet'
    assert written['meta']['converted_from'] == str(src)
    assert written['meta']['dataset_meta']['classes'] == authors_file({}, case)['meta']['CLASSES']
    assert written['meta'][f'source_{scope}_version'].startswith('0.13' if scope == 'mmseg'
                                                                 else '2.11')
    model = build_model(case.config, device='cpu')
    model.load_state_dict(written['state_dict'], strict=True)
    state = model.state_dict()
    for theirs, ours, expected in spot_checks(case):
        assert torch.equal(state[ours], expected(source[theirs])), (theirs, ours)


def test_tool_names_the_offenders_of_a_mismatched_model(authors_files, tmp_path):
    src, _ = authors_files['fpn_lit-ti']
    dst = tmp_path / 'never.pth'
    with pytest.raises(SystemExit) as raised:
        load_converter().main([str(CONFIGS / CASES['fpn_lit-s'].config), str(src), str(dst)])
    message = str(raised.value.code)
    assert message.startswith(f'{src} does not fit the model of ')
    assert ('backbone.patch_embed.projection.weight: checkpoint (64, 3, 4, 4) vs model '
            '(96, 3, 4, 4)') in message
    assert 'missing' in message and 'unexpected' in message
    assert not dst.exists()


def test_module_keeps_to_the_models_layer():
    """Only mmsparsevit.models / mmsparsevit.utils from the package, no mmdet / mmseg."""
    tree = ast.parse(MODULE_FILE.read_text())
    imported = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            imported.append('.' * node.level + (node.module or ''))
    for name in imported:
        assert not name.startswith(('mmdet', 'mmseg')), name
        if name.startswith('mmsparsevit'):
            assert name.startswith(('mmsparsevit.models', 'mmsparsevit.utils')), name
        if name.startswith('.'):
            assert not name.startswith('..'), name  # relative: inside mmsparsevit.models


@pytest.mark.parametrize('name', ['retinanet_lit-s', 'fpn_lit-ti'])
def test_test_tool_loads_the_release_directly(name, authors_files, tmp_path):
    """tools/test.py's loading (harden_test_config + load_from) converts the release on load:
    no converter step, every spot-checked tensor in place."""
    case = CASES[name]
    src, source = authors_files[name]
    cfg = Config.fromfile(str(CONFIGS / case.config))
    cfg.work_dir, cfg.load_from = str(tmp_path), str(src)
    runner = Runner.from_cfg(harden_test_config(cfg))
    runner.load_or_resume()
    state = runner.model.state_dict()
    for theirs, ours, expected in spot_checks(case):
        assert torch.equal(state[ours], expected(source[theirs])), (theirs, ours)
