"""The mmsparsevit registry: cross-toolbox building with custom_imports as the only glue."""
import subprocess
import sys
import textwrap

import pytest
from mmengine.registry import MODELS as ROOT_MODELS
from mmengine.registry import DefaultScope

from mmsparsevit.registry import HOOKS, MODELS, TRANSFORMS

TINY_VVT = dict(
    type='mmsparsevit.VVT',
    arch=dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
              mlp_ratios=(2, 2, 2, 2)))
TINY_LIT = dict(
    type='mmsparsevit.LIT',
    arch=dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
              mlp_ratios=(2, 2, 2, 2)))
EXPECTED_BACKBONES = {'VVT', 'LIT', 'KVT'}


def test_registries_are_scoped_children_of_mmengine_roots():
    from mmengine.registry import HOOKS as ROOT_HOOKS
    from mmengine.registry import TRANSFORMS as ROOT_TRANSFORMS
    for registry, root in ((MODELS, ROOT_MODELS), (HOOKS, ROOT_HOOKS),
                           (TRANSFORMS, ROOT_TRANSFORMS)):
        assert registry.scope == 'mmsparsevit'
        assert registry.parent is root
        assert root.children['mmsparsevit'] is registry


def test_runtime_parts_resolve_by_prefixed_name_without_explicit_import():
    # mmengine imports mmsparsevit.registry and the registry's locations on first look-up.
    hook = HOOKS.get('mmsparsevit.NonFiniteLossHook')
    transform = TRANSFORMS.get('mmsparsevit.CheckLoadedSample')
    assert hook.__name__ == 'NonFiniteLossHook'
    assert transform.__name__ == 'CheckLoadedSample'


def test_all_backbones_are_registered():
    import mmsparsevit.models  # noqa: F401
    assert EXPECTED_BACKBONES <= set(MODELS.module_dict)


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_misspelt_type_fails_with_mmengine_key_error(scope):
    toolbox = pytest.importorskip(f'{scope}.registry')
    with DefaultScope.overwrite_default_scope(scope):
        message = rf'mmsparsevit.VTT is not in the {scope}::model registry'
        with pytest.raises(KeyError, match=message):
            toolbox.MODELS.build(dict(type='mmsparsevit.VTT'))


DETECTOR_CONFIG = """
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmsparsevit.models'], allow_failed_imports=False)
model = dict(
    backbone=dict(_delete_=True, **{backbone}),
    neck=dict(in_channels={channels}, start_level=1))
"""

SEGMENTOR_CONFIG = """
_base_ = 'mmseg::sem_fpn/fpn_r50_4xb4-160k_ade20k-512x512.py'
custom_imports = dict(imports=['mmsparsevit.models'], allow_failed_imports=False)
model = dict(
    pretrained=None,
    data_preprocessor=dict(size=(64, 64)),
    backbone=dict(_delete_=True, **{backbone}),
    neck=dict(in_channels={channels}))
"""

# Runs in a fresh interpreter that never imports mmsparsevit itself: the config's
# custom_imports must be all it takes, and the backbone's inner bricks must resolve too.
BUILD_AND_RUN = """
import sys, torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
cfg = Config.fromfile(sys.argv[1])
init_default_scope(cfg.default_scope)
assert 'mmsparsevit' not in sys.modules or 'mmsparsevit.models' in sys.modules
registry = __import__(cfg.default_scope + '.registry', fromlist=['MODELS']).MODELS
model = registry.build(cfg.model)
model.init_weights()
model.eval()
with torch.no_grad():
    features = model.extract_feat(torch.rand(1, 3, 64, 96))
print(type(model).__name__, type(model.backbone).__name__,
      [tuple(f.shape) for f in features])
"""


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['detector', 'segmentor'])
@pytest.mark.parametrize('backbone', [TINY_VVT, TINY_LIT], ids=['VVT', 'LIT'])
def test_full_model_builds_from_toolbox_config_with_custom_imports_only(tmp_path, kind, backbone):
    template = DETECTOR_CONFIG if kind == 'detector' else SEGMENTOR_CONFIG
    config = tmp_path / f'{kind}.py'
    config.write_text(template.format(backbone=backbone, channels=[16, 32, 48, 64]))
    script = tmp_path / 'build.py'
    script.write_text(textwrap.dedent(BUILD_AND_RUN))
    result = subprocess.run([sys.executable, str(script), str(config)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    model_name, backbone_name, shapes = result.stdout.strip().splitlines()[-1].split(' ', 2)
    assert model_name == ('RetinaNet' if kind == 'detector' else 'EncoderDecoder')
    assert backbone_name == backbone['type'].split('.')[1]
    if kind == 'detector':
        # FPN from level 1 with 5 outputs: strides 8..128 of a 64x96 input.
        assert shapes == '[(1, 256, 8, 12), (1, 256, 4, 6), (1, 256, 2, 3), (1, 256, 1, 2), ' \
                         '(1, 256, 1, 1)]'
    else:
        assert shapes == '[(1, 256, 16, 24), (1, 256, 8, 12), (1, 256, 4, 6), (1, 256, 2, 3)]'
