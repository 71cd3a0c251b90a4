"""The benchmark against the authors' own code: how it imports their files.

Their repositories are not available here (no network in the tests), so a checkout is laid
out in a temporary folder with a file that has the import block of their LIT detection
backbone; the benchmark itself was run against the real checkouts (docs/model_zoo.md).
"""
import sys

import pytest
import torch
import torch.nn.functional as F
from test_cost_tools import load_tool

from measure import authors
from measure.benchmark import AUTHORS, BenchmarkCase

# The import block of zhuang-group/LIT detection/mmdet/models/backbones/lit.py.
LIT_IMPORTS = '''\
import torch
import torch.nn as nn
from timm.models.layers import DropPath, to_2tuple, trunc_normal_
from mmcv_custom import load_checkpoint
from mmdet.utils import get_root_logger
from ..builder import BACKBONES
from mm_modules.DCN.modules.deform_conv2d import DeformConv2dPack

print('printed at import')


@BACKBONES.register_module()
class LIT(nn.Module):
    def __init__(self, **settings):
        super().__init__()
        self.settings = settings
        self.dconv = DeformConv2dPack(4, 8, kernel_size=2, stride=2, padding=0)
        get_root_logger().debug('built')

    def forward(self, x):
        return self.dconv(x)
'''


@pytest.fixture
def lit_checkout(tmp_path, monkeypatch):
    path = tmp_path / authors.LIT_FILE
    path.parent.mkdir(parents=True)
    path.write_text(LIT_IMPORTS)
    monkeypatch.setattr(authors, '_IMPORTED', {})
    return tmp_path


def test_lit_file_imports_with_stand_ins_that_leave_no_trace(lit_checkout, capsys):
    import mmdet.utils
    real_mmdet_utils = sys.modules['mmdet.utils']
    module = authors._import_file(
        authors.authors_file('lit-s-coco', str(lit_checkout)), 'authors_lit.models.backbones.lit',
        authors._lit_stand_ins())
    assert sys.modules['mmdet.utils'] is real_mmdet_utils is mmdet.utils
    assert not any(name.split('.')[0] in ('mm_modules', 'mmcv_custom', 'authors_lit')
                   for name in sys.modules if name != 'authors_lit.models.backbones.lit')
    assert capsys.readouterr().out == ''
    model = module.LIT(embed_dim=96)
    assert model.settings == dict(embed_dim=96)
    assert set(model.state_dict()) == {
        'dconv.weight', 'dconv.bias', 'dconv.conv_offset.weight', 'dconv.conv_offset.bias'
    }


def test_deform_conv_stand_in_is_a_convolution_at_zero_offsets():
    torch.manual_seed(0)
    conv = authors._DeformConv2dPack(4, 8, kernel_size=2, stride=2, padding=0)
    x = torch.randn(2, 4, 6, 6)
    for parameter in (conv.weight, conv.bias):
        parameter.data.normal_()
    out, none = conv(x)
    assert none is None
    torch.testing.assert_close(out, F.conv2d(x, conv.weight, conv.bias, stride=2))
    conv.conv_offset.bias.data.fill_(0.5)
    shifted, offset = conv(x, return_offset=True)
    assert offset.shape == (2, 8, 3, 3) and torch.all(offset == 0.5)
    assert not torch.allclose(shifted, out)


def test_a_folder_that_is_not_their_checkout_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='zhuang-group/LIT'):
        authors.authors_file('lit-s-coco', str(tmp_path))
    tool = load_tool('benchmark_authors')
    with pytest.raises(SystemExit):
        tool.parse_args(['--repo', f'vvt-s={tmp_path}'])
    with pytest.raises(SystemExit):
        tool.parse_args(['--repo', f'kvt-swin-t={tmp_path}'])


def test_authors_cases_need_their_checkout():
    with pytest.raises(ValueError, match='authors_repo'):
        BenchmarkCase(shape=(64, 64), batch_size=1, mode='inference', backbone='lit-s',
                      implementation=AUTHORS)
    with pytest.raises(ValueError, match='authors_repo'):
        BenchmarkCase(shape=(64, 64), batch_size=1, mode='inference', backbone='lit-s',
                      implementation='ours', authors_repo='/somewhere')
