# Copyright (c) mmsparsevit contributors. All rights reserved.
import json

import cv2
import numpy as np
import pytest
from tool_test_utils import load_tool

demo = load_tool('dataset_converters/make_demo_data.py')
SMALL = dict(num_train=3, num_val=2, size=64, max_objects=3)


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


@pytest.mark.parametrize('dataset', ['coco', 'ade'])
def test_same_seed_gives_identical_files(tmp_path, dataset):
    demo.make_demo_dataset(dataset, tmp_path / 'a', seed=3, **SMALL)
    demo.make_demo_dataset(dataset, tmp_path / 'b', seed=3, **SMALL)
    demo.make_demo_dataset(dataset, tmp_path / 'c', seed=4, **SMALL)
    first, second, other = (_files(tmp_path / name) for name in 'abc')
    assert len(first) == {'coco': 2 + 3 + 2 + 1, 'ade': 2 * (3 + 2) + 1}[dataset]
    assert first == second
    images = [name for name in first if name.suffix == '.jpg']
    assert all(first[name] != other[name] for name in images)


def test_rerun_is_a_no_op_and_new_settings_rewrite(tmp_path):
    root = tmp_path / 'coco'
    assert demo.make_demo_dataset('coco', root, **SMALL) is True
    stamp = (root / 'train' / '000001.jpg').stat().st_mtime_ns
    assert demo.make_demo_dataset('coco', root, **SMALL) is False
    assert (root / 'train' / '000001.jpg').stat().st_mtime_ns == stamp
    assert demo.make_demo_dataset('coco', root, **{**SMALL, 'num_train': 2}) is True
    assert sorted(p.name for p in (root / 'train').iterdir()) == ['000001.jpg', '000002.jpg']


def test_interrupted_run_is_redone(tmp_path):
    root = tmp_path / 'ade'
    demo.make_demo_dataset('ade', root, **SMALL)
    (root / demo.MANIFEST).unlink()
    (root / 'images' / 'training' / '000000.jpg').unlink()
    assert demo.make_demo_dataset('ade', root, **SMALL) is True
    assert (root / 'images' / 'training' / '000000.jpg').is_file()


def test_coco_annotations_match_the_drawn_shapes(tmp_path):
    demo.make_demo_dataset('coco', tmp_path, **SMALL)
    coco = json.loads((tmp_path / 'annotations' / 'instances_train.json').read_text())
    assert [c['name'] for c in coco['categories']] == ['circle', 'square', 'triangle']
    assert [c['id'] for c in coco['categories']] == [1, 2, 3]
    assert len(coco['images']) == 3 and coco['annotations']
    assert len({a['id'] for a in coco['annotations']}) == len(coco['annotations'])
    for annotation in coco['annotations']:
        polygon = np.asarray(annotation['segmentation'][0]).reshape(-1, 2)
        x, y, w, h = annotation['bbox']
        assert len(polygon) == {1: 32, 2: 4, 3: 3}[annotation['category_id']]
        # Every number is written with two decimals (rounded by at most 0.005): x + w holds
        # two roundings and the polygon's extreme one, so they differ by at most 0.015.
        np.testing.assert_allclose([x, y, x + w, y + h],
                                   [*polygon.min(axis=0), *polygon.max(axis=0)], atol=0.015)
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64
        # The area is the unrounded polygon's: moving every vertex by at most 0.005 * sqrt(2)
        # changes a polygon's area by at most that times its perimeter (to first order; the
        # second-order term is below 1e-4 per vertex), and the area is itself rounded.
        perimeter = np.linalg.norm(polygon - np.roll(polygon, 1, axis=0), axis=1).sum()
        bound = perimeter * 0.005 * np.sqrt(2) + 1e-4 * len(polygon) + 0.005
        assert abs(annotation['area'] - demo.polygon_area(polygon)) <= bound
        assert annotation['area'] < w * h and annotation['iscrowd'] == 0
    image = cv2.imread(str(tmp_path / 'train' / coco['images'][0]['file_name']))
    assert image.shape == (64, 64, 3)


def test_ade_label_maps_follow_the_ade20k_convention(tmp_path):
    demo.make_demo_dataset('ade', tmp_path, **SMALL)
    for split, count in (('training', 3), ('validation', 2)):
        labels = sorted((tmp_path / 'annotations' / split).iterdir())
        assert [p.stem for p in labels] == [f'{i:06d}' for i in range(count)]
        for path in labels:
            label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            assert label.shape == (64, 64) and label.dtype == np.uint8
            # 0 unlabelled borders, 1 background, 2..4 the shapes; every map has an object.
            assert set(np.unique(label)) <= {0, 1, 2, 3, 4}
            assert {0, 1} <= set(np.unique(label)) and label.max() >= 2


def test_polygon_area_is_the_shoelace_area():
    square = np.array([[0, 0], [4, 0], [4, 3], [0, 3]], dtype=np.float32)
    assert demo.polygon_area(square) == 12
    assert demo.polygon_area(square[::-1]) == 12


def test_cli_rejects_bad_sizes(capsys):
    with pytest.raises(SystemExit):
        demo.main(['--size', '8'])
    assert '--size must be at least 32' in capsys.readouterr().err
