# Copyright (c) mmsparsevit contributors. All rights reserved.
"""The contract VVT and LIT share through ``SparseViTBackbone``: arch parsing, out_indices,
frozen_stages, norm_eval, the drop-path schedule, init_cfg and the checkpoint converters."""
import logging

import pytest
import torch
from mmengine.logging import MMLogger
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmsparsevit.models import LIT, VVT
from mmsparsevit.models.backbones.lit import convert_lit_checkpoint
from mmsparsevit.models.backbones.vvt import convert_vvt_checkpoint

ARCHS = {
    VVT: dict(embed_dims=(16, 24, 32, 48), depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 3),
              mlp_ratios=(2, 2, 4, 2)),
    LIT: dict(embed_dims=(16, 32, 48, 64), depths=(1, 2, 1, 1), num_heads=(1, 2, 3, 4),
              mlp_ratios=(2, 2, 2, 2)),
}
CONVERTERS = {VVT: convert_vvt_checkpoint, LIT: convert_lit_checkpoint}
BACKBONES = pytest.mark.parametrize('cls', [VVT, LIT], ids=['VVT', 'LIT'])


def build(cls, **kwargs):
    kwargs.setdefault('arch', ARCHS[cls])
    return cls(**kwargs)


class _Records(logging.Handler):

    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def log():
    logger = MMLogger.get_current_instance()
    records = _Records()
    logger.addHandler(records)
    yield records.messages
    logger.removeHandler(records)


@pytest.mark.parametrize('cls,alias,name', [(VVT, 'S', 'small'), (LIT, 'ti', 'tiny'),
                                            (LIT, 'Base', 'base')])
def test_presets_have_aliases_in_any_case(cls, alias, name):
    assert cls.parse_arch(alias) == cls.parse_arch(name)


@BACKBONES
@pytest.mark.parametrize('make_arch,error,match', [
    (lambda arch: 'huge', KeyError, r"unknown \w+ arch 'huge'; choose one of \[.*'tiny'"),
    (lambda arch: dict(embed_dims=(8, ), depths=(1, )), KeyError,
     r"missing keys \['num_heads', 'mlp_ratios'\], unknown keys \[\]"),
    (lambda arch: dict(arch, window=7), KeyError, r"unknown keys \['window'\]"),
    (lambda arch: dict(arch, depths=(1, 1)), ValueError,
     r"'embed_dims' must list one value per stage \(2 stages"),
    (lambda arch: dict(arch, depths=4), ValueError,
     "'depths' must list the blocks of each stage, got 4"),
    (lambda arch: 3, TypeError, 'arch must be a str or a dict, got int'),
])
def test_arch_errors_name_the_offender(cls, make_arch, error, match):
    with pytest.raises(error, match=match):
        cls.parse_arch(make_arch(ARCHS[cls]))


@BACKBONES
def test_out_indices_accept_ints_and_negative_indices(cls):
    assert build(cls, out_indices=-1).out_indices == (3, )
    model = build(cls, out_indices=(3, -3, 1)).eval()
    assert model.out_indices == (1, 3)
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 32, 32))
    assert [out.shape[1] for out in outs] == [model.num_features[1], model.num_features[3]]
    with pytest.raises(ValueError, match=r'out_indices entry -5 is out of range .*-4\.\.3'):
        build(cls, out_indices=(0, -5))
    with pytest.raises(TypeError, match='non-empty sequence'):
        build(cls, out_indices=())


@BACKBONES
def test_frozen_stages_are_reapplied_by_train(cls):
    model = build(cls, frozen_stages=1)
    model.train()
    frozen = model.stem_modules() + model.stage_modules(0)
    for module in frozen:
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert all(p.requires_grad for module in model.stage_modules(1) for p in module.parameters())
    with pytest.raises(ValueError, match=r'frozen_stages must be in \[-1, 4\], got 5'):
        build(cls, frozen_stages=5)


@pytest.mark.parametrize('sync', [False, True], ids=['BN', 'SyncBN'])
def test_norm_eval_stops_exactly_the_norms_with_running_statistics(sync):
    model = build(LIT, norm_eval=True)
    if sync:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.train()
    batch_norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert len(batch_norms) == 3  # one in each DTM
    assert all(isinstance(m, nn.SyncBatchNorm) == sync for m in batch_norms)
    assert not any(m.training for m in batch_norms)
    others = [m for m in model.modules() if not isinstance(m, _BatchNorm)]
    assert all(m.training for m in others)
    assert any(isinstance(m, nn.LayerNorm) for m in others)


@BACKBONES
def test_drop_path_rates_rise_linearly_over_all_blocks(cls):
    model = build(cls, drop_path_rate=0.4)
    rates = [list(stage) for stage in model.drop_path_rates]
    # rate * i / (n - 1) in floating point: 0.1 and 0.3 are not exactly the literals.
    assert rates == [[0.], [pytest.approx(0.1), pytest.approx(0.2)], [pytest.approx(0.3)], [0.4]]


@BACKBONES
def test_converters_share_one_contract(cls):
    other = LIT if cls is VVT else VVT
    own_layout = build(cls).state_dict()
    converted, dropped = CONVERTERS[cls]({'state_dict': own_layout})
    assert list(converted) == list(own_layout) and dropped == {}
    with pytest.raises(ValueError, match=f'not a {cls.__name__} checkpoint'):
        CONVERTERS[cls](build(other).state_dict())
    with pytest.raises(TypeError, match='a checkpoint must be a dict'):
        CONVERTERS[cls]([1, 2])


@BACKBONES
def test_init_weights_keeps_mmengine_bookkeeping(cls, log):
    model = build(cls)
    model.init_weights()
    assert model.is_init and model.stages.is_init
    before = {key: value.clone() for key, value in model.state_dict().items()}
    model.init_weights()
    assert any('has been called more than once' in message for message in log)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


@BACKBONES
def test_init_cfg_entries_refine_the_authors_initialisation(cls):
    model = build(cls, init_cfg=dict(type='Constant', layer='Linear', val=0.5, bias=0.))
    model.init_weights()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(torch.all(m.weight == 0.5) for m in linears)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert all(torch.all(m.weight == 1) for m in norms)


@BACKBONES
def test_pretrained_loads_last_through_the_converter(cls, tmp_path, log):
    torch.manual_seed(0)
    source = build(cls)
    source.init_weights()
    state = {f'backbone.{key}': value for key, value in source.state_dict().items()}
    path = tmp_path / 'detector.pth'
    torch.save({'state_dict': state}, path)
    model = build(cls, init_cfg=[
        dict(type='Pretrained', checkpoint=str(path), prefix='backbone.'),
        dict(type='Constant', layer='Linear', val=0.5)])
    model.init_weights()
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert model.is_init
    assert f'{cls.__name__}: loaded {len(source.state_dict())} tensors from {path}' in log


def test_pretrained_logs_what_the_converter_dropped(tmp_path, log):
    state = build(VVT).state_dict()
    path = tmp_path / 'classifier.pth'
    torch.save(dict(state, **{'head.weight': torch.zeros(10, 48)}), path)
    build(VVT, init_cfg=dict(type='Pretrained', checkpoint=str(path))).init_weights()
    assert 'VVT: head.weight: classification head' in log


@BACKBONES
def test_pretrained_refusals_are_value_errors_naming_the_file(cls, tmp_path):
    path = tmp_path / 'other.pth'
    torch.save(build(LIT if cls is VVT else VVT).state_dict(), path)
    with pytest.raises(ValueError, match=rf'other\.pth: not a {cls.__name__} checkpoint'):
        build(cls, init_cfg=dict(type='Pretrained', checkpoint=str(path))).init_weights()
    with pytest.raises(ValueError, match=r"other\.pth: no key starts with prefix 'backbone\.'"):
        build(cls, init_cfg=dict(type='Pretrained', checkpoint=str(path),
                                 prefix='backbone.')).init_weights()
    wider = tmp_path / 'wider.pth'
    torch.save(build(cls, arch=dict(ARCHS[cls], depths=(1, 3, 1, 1))).state_dict(), wider)
    with pytest.raises(ValueError, match=rf'wider\.pth does not match {cls.__name__}.*'
                       r'unexpected \(stages\.1\.blocks\.2\.'):
        build(cls, init_cfg=dict(type='Pretrained', checkpoint=str(wider))).init_weights()


def test_checkpoint_without_output_norms_leaves_them_initialised(tmp_path, log):
    path = tmp_path / 'no_norms.pth'
    torch.save(build(LIT, out_norms=()).state_dict(), path)
    model = build(LIT, out_norms=(1, 3), init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    assert torch.equal(model.norm3.weight, torch.ones(64))
    assert ('LIT: not in the checkpoint, newly initialised: norm1.weight, norm1.bias, '
            'norm3.weight, norm3.bias') in log
