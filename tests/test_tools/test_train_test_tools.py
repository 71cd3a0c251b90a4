# Copyright (c) mmsparsevit contributors. All rights reserved.
"""tools/train.py, tools/test.py and tools/inference.py end to end on fixture data."""
import json
import pickle

import cv2
import pytest
from mmengine.runner import CheckpointLoader
from tool_test_utils import (DET_CONFIG, FIXTURE_SIZE, SEG_CONFIG, data_options,
                             make_fixture_data, run_tool)

import mmsparsevit  # noqa: F401  installs the checkpoint allow-list

pytestmark = pytest.mark.slow
CASES = dict(det=(DET_CONFIG, 'coco/bbox_mAP'), seg=(SEG_CONFIG, 'mIoU'))
ITERS = 4


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return make_fixture_data(tmp_path_factory.mktemp('data'), num_train=4, num_val=2)


def _check(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _train(config, data_root, work_dir, iters, *extra):
    return _check(run_tool('train.py', [
        config, '--work-dir', work_dir, *extra, '--cfg-options',
        *data_options(config, data_root), f'train_cfg.max_iters={iters}',
        f'train_cfg.val_interval={iters}', 'default_hooks.checkpoint.interval=2',
        'default_hooks.checkpoint.max_keep_ckpts=-1', 'default_hooks.logger.interval=1'
    ]))


def _logged_iterations(work_dir):
    """Iterations logged by the training runs in ``work_dir``, one list per run, in order."""
    runs = []
    for log in sorted(work_dir.glob('*/vis_data/scalars.json')):
        records = [json.loads(line) for line in log.read_text().splitlines()]
        runs.append([r['step'] for r in records if 'loss' in r])
    return runs


@pytest.fixture(scope='module', params=sorted(CASES))
def trained(request, data_root, tmp_path_factory):
    config, metric = CASES[request.param]
    work_dir = tmp_path_factory.mktemp(f'work-{request.param}')
    _train(config, data_root, work_dir, ITERS)
    return request.param, config, metric, work_dir


def test_train_writes_checkpoints_and_logs_every_iteration(trained):
    _, _, _, work_dir = trained
    assert (work_dir / 'last_checkpoint').read_text().strip() == str(work_dir / 'iter_4.pth')
    assert (work_dir / 'iter_2.pth').is_file()
    checkpoint = CheckpointLoader.load_checkpoint(str(work_dir / 'iter_4.pth'),
                                                  map_location='cpu')
    assert checkpoint['meta']['iter'] == ITERS
    assert any(key.startswith('backbone.stages.') for key in checkpoint['state_dict'])
    assert _logged_iterations(work_dir) == [[1, 2, 3, 4]]


def test_test_tool_evaluates_dumps_and_draws(trained, data_root, tmp_path):
    task, config, metric, work_dir = trained
    out = tmp_path / 'predictions.pkl'
    show_dir = tmp_path / 'vis'
    _check(run_tool('test.py', [
        config, work_dir / 'iter_4.pth', '--work-dir', tmp_path / 'test', '--out', out,
        '--show-dir', show_dir, '--cfg-options', *data_options(config, data_root),
        # Boxes of any score, so that a model trained for 4 iterations is still scored.
        *(['model.test_cfg.score_thr=0'] if task == 'det' else [])
    ]))
    logs = list((tmp_path / 'test').glob('*/*.json'))
    assert len(logs) == 1
    metrics = json.loads(logs[0].read_text().strip().splitlines()[-1])
    assert 0 <= metrics[metric] <= (1 if task == 'det' else 100)
    with open(out, 'rb') as f:
        predictions = pickle.load(f)
    assert len(predictions) == 2
    assert {'pred_instances' if task == 'det' else 'pred_sem_seg'} <= set(predictions[0])
    drawings = sorted(show_dir.rglob('*.png')) + sorted(show_dir.rglob('*.jpg'))
    assert len(drawings) == 2
    assert cv2.imread(str(drawings[0])).shape[:2] in ((FIXTURE_SIZE, FIXTURE_SIZE),
                                                      (FIXTURE_SIZE, 2 * FIXTURE_SIZE))


def test_resume_continues_at_the_next_iteration(trained, data_root):
    _, config, _, work_dir = trained
    _train(config, data_root, work_dir, ITERS + 2, '--resume')
    assert _logged_iterations(work_dir) == [[1, 2, 3, 4], [5, 6]]
    checkpoint = CheckpointLoader.load_checkpoint(str(work_dir / 'iter_6.pth'),
                                                  map_location='cpu')
    assert checkpoint['meta']['iter'] == ITERS + 2


def test_resume_from_a_named_checkpoint(trained, data_root, tmp_path):
    _, config, _, work_dir = trained
    _train(config, data_root, tmp_path, ITERS + 1, '--resume', work_dir / 'iter_2.pth')
    assert _logged_iterations(tmp_path) == [[3, 4, 5]]


def test_inference_draws_a_png_of_the_input_size(trained, data_root, tmp_path):
    _, config, _, work_dir = trained
    image = cv2.imread(str(data_root / 'coco' / 'val' / '000001.jpg'))
    wide = cv2.resize(image, (96, 48))
    source = tmp_path / 'wide.jpg'
    cv2.imwrite(str(source), wide)
    out = tmp_path / 'drawn' / 'prediction.png'
    result = _check(run_tool('inference.py', [config, work_dir / 'iter_4.pth', source, '--out',
                                              out, '--score-thr', '0']))
    assert f'wrote {out}' in result.stdout
    drawn = cv2.imread(str(out))
    assert drawn.shape == (48, 96, 3)
    assert (drawn != wide).any()
