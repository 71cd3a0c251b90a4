# Copyright (c) mmsparsevit contributors. All rights reserved.
"""tools/analysis_tools/visualize_results.py: the gallery (ground truth | prediction per test
image, upscaled, in a grid) and the training curve (loss and validation metric)."""
import json

import mmcv
import pytest
from tool_test_utils import (DET_CONFIG, SEG_CONFIG, load_tool, make_fixture_data,
                             save_untrained_checkpoint)


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return make_fixture_data(tmp_path_factory.mktemp('data'), num_train=1, num_val=3)


@pytest.mark.parametrize('config,dataset', [(DET_CONFIG, 'coco'), (SEG_CONFIG, 'ade')])
def test_gallery_shows_ground_truth_beside_prediction_for_each_image(config, dataset,
                                                                     data_root, tmp_path):
    tool = load_tool('analysis_tools/visualize_results.py')
    checkpoint = save_untrained_checkpoint(config, tmp_path / 'model.pth')
    tool.main([str(config), str(checkpoint), '--out-dir', str(tmp_path),
               '--num-images', '3', '--size', '128', '--score-thr', '0', '--cfg-options',
               f'test_dataloader.dataset.data_root={data_root / dataset}/'])
    gallery = mmcv.imread(str(tmp_path / 'gallery.png'))
    # Three 64-px images upscaled x2, each 128 x (128 + 128): a grid of 2 rows x 2 columns.
    assert gallery.shape == (2 * 128, 2 * 256, 3)
    first, empty = gallery[:128, :256], gallery[128:, 256:]
    assert (empty == 255).all() and first.std() > 0
    # The two halves of a tile differ: ground truth and prediction are drawn separately.
    assert (first[:, :128] != first[:, 128:]).any()


def test_training_curve_reads_loss_and_metric_of_the_newest_run(tmp_path):
    tool = load_tool('analysis_tools/visualize_results.py')
    for run, scale in (('20260101_000000', 1.0), ('20260102_000000', 2.0)):
        folder = tmp_path / run / 'vis_data'
        folder.mkdir(parents=True)
        # As mmengine writes an iteration-based run: validations carry step 0 (their epoch).
        train = [dict(loss=scale / step, lr=1e-3, step=step) for step in (50, 100, 150)]
        records = [train[0], train[1], {'coco/bbox_mAP': 0.2 * scale, 'step': 0}, train[2],
                   {'coco/bbox_mAP': 0.4 * scale, 'step': 0}]
        (folder / 'scalars.json').write_text('\n'.join(map(json.dumps, records)))
    losses, metrics = tool.read_scalars(str(tmp_path))
    assert losses == [(50, 2 / 50), (100, 2 / 100), (150, 2 / 150)]
    assert metrics == {'coco/bbox_mAP': [(100, 0.4), (150, 0.8)]}
    out = tmp_path / 'curve.png'
    tool.draw_training_curve(str(tmp_path), str(out), ['coco/bbox_mAP'])
    assert mmcv.imread(str(out)).shape[:2] == (480, 840)  # 7 x 4 inches at 120 dpi
    with pytest.raises(FileNotFoundError, match='scalars.json'):
        tool.read_scalars(str(tmp_path / 'nothing'))
