# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Bad data is filtered with a warning naming the file, or stops with an error naming it.

Datasets are the demo generator's, copied and then corrupted one way per test. Undecodable
images through tools/train.py are covered by tests/test_tools/test_tool_input_errors.py.
"""
import copy
import json
import shutil
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from mmengine.registry import DATASETS, init_default_scope
import torch
from robustness_utils import (DET_CONFIG, SEG_CONFIG, capture_warnings, data_options,
                              fixture_config, make_fixture_data, run_tool)

from mmsparsevit.datasets import DataCheckError, audit_coco_annotations, data_checks
from mmsparsevit.engine import DataAuditHook
from mmsparsevit.runtime import (ConfigCheckError, check_config, harden_test_config,
                                 harden_train_config)

SEG_NUM_CLASSES = 4


@pytest.fixture(scope='module')
def pristine(tmp_path_factory):
    return make_fixture_data(tmp_path_factory.mktemp('pristine'), num_train=4, num_val=1)


@pytest.fixture
def data_root(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / 'data')


def _coco(data_root):
    path = data_root / 'coco' / 'annotations' / 'instances_train.json'
    return path, json.loads(path.read_text())


def _build(config, data_root, phase='train'):
    cfg = harden_train_config(fixture_config(config, data_root))
    init_default_scope(cfg.default_scope)
    return DATASETS.build(cfg[f'{phase}_dataloader'].dataset)


def _image_file(data_root, content, image_id):
    name = next(i['file_name'] for i in content['images'] if i['id'] == image_id)
    return str(data_root / 'coco' / 'train' / name)


def _infos(dataset):
    return [dataset.get_data_info(index) for index in range(len(dataset))]


def _instances(dataset, image_file):
    info = next(info for info in _infos(dataset) if info['img_path'] == image_file)
    return [instance['bbox'] for instance in info['instances']]


def _copy_of(ann, new_id, **changes):
    return {**ann, 'id': new_id, 'bbox': list(ann['bbox']), **changes}


def test_dropped_boxes_and_emptied_images_are_reported_by_file(data_root, monkeypatch):
    path, content = _coco(data_root)
    anns = content['annotations']
    first = {}
    for ann in anns:
        first.setdefault(ann['image_id'], ann)
    ids = sorted(first)
    assert len(ids) == 4
    next_id = max(ann['id'] for ann in anns) + 1
    # Image 1 gains a zero-width box, image 3 a box reaching left of the image; every box of
    # image 2 is moved outside it and image 4 loses its annotations.
    zero = _copy_of(first[ids[0]], next_id)
    zero['bbox'][2] = 0.0
    partly = _copy_of(first[ids[2]], next_id + 1)
    partly['bbox'][0] = -5.0
    for ann in anns:
        if ann['image_id'] == ids[1]:
            ann['bbox'][:2] = [500.0, 500.0]
    content['annotations'] = [a for a in anns if a['image_id'] != ids[3]] + [zero, partly]
    path.write_text(json.dumps(content))

    logged = capture_warnings(monkeypatch, data_checks)
    dataset = _build(DET_CONFIG, data_root)
    DataAuditHook().before_train(SimpleNamespace(train_dataloader=SimpleNamespace(
        dataset=dataset)))
    files = [_image_file(data_root, content, image_id) for image_id in ids]
    moved = sum(ann['image_id'] == ids[1] for ann in anns)
    assert logged == [
        f'{path}: 1 boxes of zero area (or under 1 px) are dropped, in {files[0]}',
        f'{path}: 1 boxes entirely outside their image are dropped, in {files[1]}',
        f'{path}: 1 boxes reaching beyond their image are kept and clipped by the pipeline, '
        f'in {files[2]}',
        f'{path}: 1 images lost all their boxes to the rules above and train as background: '
        f'{files[1]}',
        f'{path}: 1 images without annotations are left out of training: {files[3]}',
    ]
    assert moved >= 1
    # The report matches what mmdet actually did with those annotations.
    assert [info['img_path'] for info in _infos(dataset)] == files[:3]
    x, y, w, h = zero['bbox']
    assert [x, y, x + w, y + h] not in _instances(dataset, files[0])
    assert _instances(dataset, files[1]) == []
    x, y, w, h = partly['bbox']
    assert [x, y, x + w, y + h] in _instances(dataset, files[2])


def test_category_outside_the_label_set_stops_with_the_file(data_root):
    path, content = _coco(data_root)
    bad = content['annotations'][1]
    bad['category_id'] = 7
    path.write_text(json.dumps(content))
    dataset = _build(DET_CONFIG, data_root)
    # mmdet itself drops the box without a word ...
    assert len(sum((info['instances'] for info in _infos(dataset)), [])) == len(
        content['annotations']) - 1
    # ... the audit stops the run instead.
    with pytest.raises(DataCheckError) as raised:
        DataAuditHook().before_train(SimpleNamespace(train_dataloader=SimpleNamespace(
            dataset=dataset)))
    assert str(raised.value) == (
        f'{path}: annotation {bad["id"]} of image '
        f'{_image_file(data_root, content, bad["image_id"])} has category_id 7, which is not '
        "among the file's categories [1, 2, 3]")


def _break_category(content):
    content['annotations'][1]['category_id'] = 7


def _break_image_entry(content):
    del content['images'][2]['height']


def _break_annotation_link(content):
    content['annotations'][0]['image_id'] = 99


@pytest.mark.parametrize('break_file, classes', [
    (_break_category, None),
    (_break_image_entry, None),
    (_break_annotation_link, None),
    (lambda content: None, ['circle', 'hexagon', 'triangle']),
])
def test_pre_flight_and_audit_apply_the_same_coco_rules(data_root, break_file, classes):
    path, content = _coco(data_root)
    break_file(content)
    path.write_text(json.dumps(content))
    options = [f'train_dataloader.dataset.metainfo.classes={classes}'] if classes else []
    cfg = fixture_config(DET_CONFIG, data_root, *options)
    with pytest.raises(DataCheckError) as audited:
        audit_coco_annotations(str(path), img_prefix=str(data_root / 'coco' / 'train'),
                               classes=classes or ['circle', 'square', 'triangle'])
    with pytest.raises(ConfigCheckError) as checked:
        check_config(cfg, 'train')
    assert str(checked.value) == f'train_dataloader.dataset.ann_file: {audited.value}'


def test_wrapped_datasets_are_walked_alike_by_every_check(data_root, monkeypatch, tmp_path):
    path, content = _coco(data_root)
    first = content['annotations'][0]
    content['annotations'].append(_copy_of(first, 1000, area=0.0))
    path.write_text(json.dumps(content))
    cfg = fixture_config(DET_CONFIG, data_root)
    leaf = cfg.train_dataloader.dataset
    cfg.train_dataloader.dataset = dict(type='RepeatDataset', times=2, dataset=dict(
        type='ConcatDataset', datasets=[leaf, copy.deepcopy(leaf)]))
    cfg = harden_train_config(cfg)
    wrapped = cfg.train_dataloader.dataset
    for dataset in wrapped.dataset.datasets:
        types = [t['type'] for t in dataset.pipeline]
        assert types[types.index('LoadAnnotations') + 1] == 'mmsparsevit.CheckLoadedSample'

    logged = capture_warnings(monkeypatch, data_checks)
    init_default_scope(cfg.default_scope)
    DataAuditHook().before_train(SimpleNamespace(train_dataloader=SimpleNamespace(
        dataset=DATASETS.build(wrapped))))
    zero_area = [message for message in logged if 'zero area' in message]
    assert zero_area == [f'{path}: 1 boxes of zero area (or under 1 px) are dropped, in '
                         f'{_image_file(data_root, content, first["image_id"])}'] * 2

    not_coco = tmp_path / 'labels.json'
    not_coco.write_text('[]')
    wrapped.dataset.datasets[1].ann_file = str(not_coco)
    with pytest.raises(ConfigCheckError, match=r'^train_dataloader\.dataset\.dataset\.'
                       r'datasets\[1\]\.ann_file: .* is not a COCO annotation file'):
        check_config(cfg, 'train')


def test_audit_of_a_clean_file_is_silent(pristine, monkeypatch):
    logged = capture_warnings(monkeypatch, data_checks)
    findings = audit_coco_annotations(
        str(pristine / 'coco' / 'annotations' / 'instances_train.json'), filter_empty_gt=True)
    assert logged == [] and not any(findings.values())


def test_image_whose_size_differs_from_its_annotation_stops_with_the_file(data_root):
    image = data_root / 'coco' / 'train' / '000002.jpg'
    cv2.imwrite(str(image), np.zeros((48, 40, 3), np.uint8))
    dataset = _build(DET_CONFIG, data_root)
    index = next(i for i, info in enumerate(_infos(dataset))
                 if info['img_path'] == str(image))
    with pytest.raises(DataCheckError) as raised:
        dataset[index]
    assert str(raised.value) == (
        f'image {image} is 48x40 (height x width) but its annotation records 64x64; the boxes '
        'would not fit the image')


def _seg_sample_error(data_root, corrupt):
    seg_map = data_root / 'ade' / 'annotations' / 'training' / '000001.png'
    corrupt(seg_map)
    dataset = _build(SEG_CONFIG, data_root)
    index = next(i for i, info in enumerate(_infos(dataset))
                 if info['seg_map_path'] == str(seg_map))
    with pytest.raises(DataCheckError) as raised:
        dataset[index]
    return seg_map, str(raised.value)


def test_segmentation_map_of_another_size_stops_with_the_file(data_root):
    seg_map, message = _seg_sample_error(
        data_root, lambda path: cv2.imwrite(str(path), cv2.imread(str(path), 0)[:, :50]))
    image = data_root / 'ade' / 'images' / 'training' / '000001.jpg'
    assert message == (f'segmentation map {seg_map} is 64x50 but its image {image} is 64x64 '
                       '(height x width); they must have the same size')


def test_segmentation_label_outside_the_classes_stops_with_the_file(data_root):

    def add_label(path):
        labels = cv2.imread(str(path), 0)
        labels[:4, :4] = 9  # ADE value 9 is class 8 after reduce_zero_label; 4 classes exist
        cv2.imwrite(str(path), labels)

    seg_map, message = _seg_sample_error(data_root, add_label)
    assert message == (
        f'segmentation map {seg_map} holds labels [8] outside the {SEG_NUM_CLASSES} classes '
        '(valid: 0..3, 255 = ignored; counted after reduce_zero_label/label_map)')


def test_clean_samples_pass_the_check_in_every_pipeline(pristine):
    for config in (DET_CONFIG, SEG_CONFIG):
        cfg = harden_train_config(fixture_config(config, pristine))
        for phase in ('train', 'val', 'test'):
            types = [t['type'] for t in cfg[f'{phase}_dataloader'].dataset.pipeline]
            position = types.index('LoadAnnotations') + 1
            assert types[position] == 'mmsparsevit.CheckLoadedSample'
        check = cfg.train_dataloader.dataset.pipeline[position]
        if config == SEG_CONFIG:
            assert (check.num_classes, check.ignore_index) == (SEG_NUM_CLASSES, 255)
        dataset = _build(config, pristine)
        assert all(dataset[i] is not None for i in range(len(dataset)))


def test_test_tool_checks_every_sample_it_evaluates(data_root, tmp_path):
    cfg = harden_test_config(fixture_config(SEG_CONFIG, data_root))
    types = [t['type'] for t in cfg.test_dataloader.dataset.pipeline]
    assert types[types.index('LoadAnnotations') + 1] == 'mmsparsevit.CheckLoadedSample'
    assert 'mmsparsevit.engine' in cfg.custom_imports['imports']

    seg_map = data_root / 'ade' / 'annotations' / 'validation' / '000000.png'
    labels = cv2.imread(str(seg_map), 0)
    labels[:4, :4] = 9
    cv2.imwrite(str(seg_map), labels)
    checkpoint = tmp_path / 'untrained.pth'
    torch.save(dict(state_dict={}), checkpoint)
    # An untrained model: --allow-partial-checkpoint lets the run reach the samples.
    result = run_tool('test.py', [
        SEG_CONFIG, checkpoint, '--work-dir', tmp_path / 'work', '--allow-partial-checkpoint',
        '--cfg-options', *data_options(SEG_CONFIG, data_root)
    ])
    assert result.returncode != 0
    assert (f'segmentation map {seg_map} holds labels [8] outside the {SEG_NUM_CLASSES} '
            'classes') in result.stderr
