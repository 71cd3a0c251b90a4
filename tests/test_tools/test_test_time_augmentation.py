# Copyright (c) mmsparsevit contributors. All rights reserved.
"""tools/test.py --tta: flip TTA for a detector, multi-scale + flip for a segmentor, both
evaluated end to end; configs without TTA settings and Mask R-CNN get a message."""
import pytest
from mmengine.config import Config
from tool_test_utils import (DET_CONFIG, REPO_ROOT, SEG_CONFIG, data_options, load_tool,
                             make_fixture_data, save_untrained_checkpoint)

from mmsparsevit.runtime import ConfigCheckError


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return make_fixture_data(tmp_path_factory.mktemp('data'), num_train=2, num_val=2)


@pytest.mark.parametrize('config,tta_type,metric', [(DET_CONFIG, 'DetTTAModel', 'coco/bbox_mAP'),
                                                    (SEG_CONFIG, 'SegTTAModel', 'mIoU')])
def test_tta_runs_end_to_end_and_is_scored(config, tta_type, metric, data_root, tmp_path):
    tool = load_tool('test.py')
    checkpoint = save_untrained_checkpoint(config, tmp_path / 'model.pth')
    args = tool.parse_args([str(config), str(checkpoint), '--tta',
                            '--work-dir', str(tmp_path / 'work'), '--cfg-options',
                            *data_options(config, data_root)])
    cfg = tool.test_config(args)
    assert cfg.model.type == tta_type and cfg.model.module.type in ('RetinaNet',
                                                                    'EncoderDecoder')
    pipeline = cfg.test_dataloader.dataset.pipeline
    augment = next(step for step in pipeline if step['type'] == 'TestTimeAug')
    flips = [t['prob'] for t in augment['transforms'][1]]
    assert sorted(flips) == [0., 1.]
    if tta_type == 'SegTTAModel':
        scales = [t['scale_factor'] for t in augment['transforms'][0]]
        assert scales == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    metrics = tool.test(args)
    assert metric in metrics and 0 <= metrics[metric] <= 100


def test_config_without_tta_settings_is_named(tmp_path):
    tool = load_tool('test.py')
    cfg = Config.fromfile(str(DET_CONFIG))
    cfg.pop('tta_pipeline')
    with pytest.raises(ConfigCheckError, match='--tta: the config sets no tta_pipeline;'):
        tool.with_test_time_augmentation(cfg)
    cfg.pop('tta_model')
    with pytest.raises(ConfigCheckError, match='sets no tta_model and no tta_pipeline'):
        tool.with_test_time_augmentation(cfg)


def test_mask_rcnn_is_refused_with_the_reason():
    tool = load_tool('test.py')
    cfg = Config.fromfile(str(REPO_ROOT / 'configs/mask_rcnn/mask-rcnn_lit-ti_fpn_1x_coco.py'))
    with pytest.raises(ConfigCheckError, match='DetTTAModel merges boxes only'):
        tool.with_test_time_augmentation(cfg)


@pytest.mark.parametrize('config', sorted((REPO_ROOT / 'configs').glob('retinanet/*.py')) +
                         sorted((REPO_ROOT / 'configs').glob('fpn/*.py')) +
                         sorted((REPO_ROOT / 'configs').glob('upernet/*.py')),
                         ids=lambda path: path.stem)
def test_shipped_retinanet_and_segmentation_configs_carry_tta(config):
    cfg = Config.fromfile(str(config))
    expected = 'DetTTAModel' if cfg.default_scope == 'mmdet' else 'SegTTAModel'
    assert cfg.tta_model.type == expected
    assert any(step['type'] == 'TestTimeAug' for step in cfg.tta_pipeline)
