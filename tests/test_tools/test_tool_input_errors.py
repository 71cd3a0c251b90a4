# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Bad input stops the tools with one line naming the file or config key at fault."""
import json

import pytest
from tool_test_utils import (DET_CONFIG, SEG_CONFIG, data_options, fixture_config, load_tool,
                             make_fixture_data, run_tool)

from mmsparsevit.runtime import ConfigCheckError, check_config

train_tool = load_tool('train.py')
test_tool = load_tool('test.py')
inference_tool = load_tool('inference.py')


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return make_fixture_data(tmp_path_factory.mktemp('data'), num_train=2, num_val=1)


def _train_error(config, options):
    with pytest.raises(SystemExit) as raised:
        train_tool.main([str(config), '--cfg-options', *options])
    message = str(raised.value.code)
    assert message.startswith('error: ') and '\n' not in message
    return message


def test_missing_config_file(tmp_path, capsys):
    missing = tmp_path / 'no_such_config.py'
    for tool, extra in ((train_tool, []), (test_tool, ['model.pth'])):
        with pytest.raises(SystemExit) as raised:
            tool.main([str(missing), *extra])
        assert raised.value.code == 2
        assert f'config file {missing} does not exist' in capsys.readouterr().err


def test_missing_dataset_folder(data_root, tmp_path):
    missing = tmp_path / 'not_there'
    message = _train_error(DET_CONFIG, [*data_options(DET_CONFIG, data_root),
                                        f'train_dataloader.dataset.data_root={missing}'])
    assert message == (f'error: train_dataloader.dataset.data_root: dataset folder {missing} '
                       'does not exist')
    message = _train_error(SEG_CONFIG, [*data_options(SEG_CONFIG, data_root),
                                        'val_dataloader.dataset.data_prefix.img_path=nope'])
    assert f'val_dataloader.dataset.data_prefix.img_path: folder {data_root}/ade/nope ' \
           'does not exist' in message


def test_missing_annotation_file(data_root):
    message = _train_error(DET_CONFIG, [*data_options(DET_CONFIG, data_root),
                                        'train_dataloader.dataset.ann_file=annotations/x.json'])
    assert message == (f'error: train_dataloader.dataset.ann_file: annotation file '
                       f'{data_root}/coco/annotations/x.json does not exist')


def test_image_folder_without_images(data_root, tmp_path):
    empty = tmp_path / 'ade'
    (empty / 'images' / 'training').mkdir(parents=True)
    (empty / 'annotations' / 'training').mkdir(parents=True)
    message = _train_error(SEG_CONFIG, [*data_options(SEG_CONFIG, data_root),
                                        f'train_dataloader.dataset.data_root={empty}'])
    assert f'no ".jpg" images in {empty}/images/training' in message


@pytest.mark.parametrize('content, reason', [
    ('{"images": [', 'it is not valid JSON'),
    ('[{"file_name": "a.jpg"}]', 'its top level is a list'),
    ('{"images": [], "categories": []}', "it has no 'annotations' list"),
    ('{"images": [{"id": 1}], "annotations": [], "categories": []}',
     "images[0] lacks ['file_name', 'height', 'width']"),
])
def test_annotation_file_that_is_not_coco(data_root, tmp_path, content, reason):
    bad = tmp_path / 'labels.json'
    bad.write_text(content)
    message = _train_error(DET_CONFIG, [*data_options(DET_CONFIG, data_root),
                                        f'train_dataloader.dataset.ann_file={bad}'])
    assert message.startswith(f'error: train_dataloader.dataset.ann_file: {bad} is not a COCO '
                              'annotation file: ')
    assert reason in message


def test_evaluator_annotation_file_that_is_not_coco(data_root, tmp_path):
    bad = tmp_path / 'gt.json'
    bad.write_text('{"licenses": []}')
    cfg = fixture_config(DET_CONFIG, data_root, f'test_evaluator.ann_file={bad}')
    with pytest.raises(ConfigCheckError, match=f'test_evaluator.ann_file: {bad} is not a COCO'):
        check_config(cfg, 'test')


def test_classes_missing_from_the_categories(data_root):
    coco = json.loads((data_root / 'coco' / 'annotations' / 'instances_train.json').read_text())
    assert [c['name'] for c in coco['categories']] == ['circle', 'square', 'triangle']
    message = _train_error(DET_CONFIG, [
        *data_options(DET_CONFIG, data_root),
        'train_dataloader.dataset.metainfo.classes=[circle,hexagon,triangle]'])
    assert "has no categories named ['hexagon']" in message


@pytest.mark.parametrize('config', [DET_CONFIG, SEG_CONFIG])
def test_neck_channels_that_do_not_match_the_backbone(data_root, config):
    # The shipped demo configs are valid: their neck reads the backbone's true channels.
    channels = fixture_config(config, data_root).model.neck.in_channels
    message = _train_error(config, [*data_options(config, data_root),
                                    'model.neck.in_channels=[96,160,320,512]'])
    assert message == (f'error: model.neck.in_channels = [96, 160, 320, 512] does not match '
                       f'the backbone: mmsparsevit.VVT returns maps with {channels} channels; '
                       f'set model.neck.in_channels={channels}')


def test_head_channels_checked_when_there_is_no_neck(data_root):
    cfg = fixture_config(SEG_CONFIG, data_root)
    cfg.model.neck = None
    cfg.model.decode_head = dict(type='UPerHead', in_channels=[32, 64, 128, 512],
                                 in_index=[0, 1, 2, 3], channels=32, num_classes=4)
    with pytest.raises(ConfigCheckError, match=r'model.decode_head.in_channels = \[32, 64, '
                       r'128, 512\] does not match .* \[32, 64, 128, 256\] channels '
                       r'\(read at in_index \[0, 1, 2, 3\]\)'):
        check_config(cfg, 'test')


def test_missing_checkpoint_for_test(data_root, tmp_path):
    with pytest.raises(SystemExit) as raised:
        test_tool.main([str(DET_CONFIG), str(tmp_path / 'gone.pth')])
    assert str(raised.value.code) == f'error: checkpoint {tmp_path / "gone.pth"} does not exist'


def test_inference_on_an_undecodable_image(tmp_path):
    broken = tmp_path / 'broken.jpg'
    broken.write_bytes(b'not an image at all')
    checkpoint = tmp_path / 'model.pth'
    checkpoint.write_bytes(b'')
    with pytest.raises(SystemExit) as raised:
        inference_tool.main([str(DET_CONFIG), str(checkpoint), str(broken), '--out',
                             str(tmp_path / 'out.png')])
    assert str(raised.value.code).startswith(f'error: cannot decode image {broken}: ')


@pytest.mark.slow
def test_training_stops_at_an_undecodable_image(tmp_path):
    data_root = make_fixture_data(tmp_path, num_train=2, num_val=1)
    broken = data_root / 'coco' / 'train' / '000002.jpg'
    broken.write_bytes(b'\xff\xd8 truncated')
    result = run_tool('train.py', [
        DET_CONFIG, '--work-dir', tmp_path / 'work', '--cfg-options',
        *data_options(DET_CONFIG, data_root), 'train_cfg.max_iters=2'
    ])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f'error: cannot decode image {broken}: the file is corrupt or not an image')
    assert 'Traceback' not in result.stderr
