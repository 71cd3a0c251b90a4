# Copyright (c) mmsparsevit contributors. All rights reserved.
"""A checkpoint that does not fit the model stops tools/test.py and tools/inference.py (unless
asked otherwise) and makes a ``load_from`` warn once with the counts."""
import logging

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner
from tool_test_utils import (DET_CONFIG, SEG_CONFIG, data_options, load_tool, make_fixture_data,
                             untrained_state_dict)

from mmsparsevit.engine import weights_match
from mmsparsevit.runtime import harden_train_config


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return make_fixture_data(tmp_path_factory.mktemp('data'), num_train=2, num_val=1)


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    """The demo detector's own weights, and a segmentor's (another model entirely)."""
    folder = tmp_path_factory.mktemp('checkpoints')
    own, other = untrained_state_dict(DET_CONFIG), untrained_state_dict(SEG_CONFIG)
    torch.save({'state_dict': own, 'meta': {}}, folder / 'detector.pth')
    torch.save({'state_dict': other, 'meta': {}}, folder / 'segmentor.pth')
    return folder, own, other


def test_test_tool_stops_on_a_checkpoint_of_another_model(checkpoints, data_root, tmp_path):
    folder, own, other = checkpoints
    path = folder / 'segmentor.pth'
    argv = [str(DET_CONFIG), str(path), '--work-dir', str(tmp_path),
            '--cfg-options', *data_options(DET_CONFIG, data_root)]
    with pytest.raises(SystemExit) as stopped:
        load_tool('test.py').main(argv)
    message = str(stopped.value.code)
    # The two demo models share their VVT backbone's keys; the detector's neck and head
    # find nothing (or tensors of other shapes) in the segmentor's file.
    missing = [key for key in own if key not in other]
    mismatched = [key for key in own if key in other and own[key].shape != other[key].shape]
    assert missing and len(missing) + len(mismatched) < len(own)
    assert message.startswith(
        f'error: {path} does not fit the model: {len(missing) + len(mismatched)} of its '
        f'{len(own)} weights would stay unloaded: {len(missing)} missing ({missing[0]}, ')
    assert '--allow-partial-checkpoint' in message

    results = tmp_path / 'results.pkl'
    load_tool('test.py').main(argv + ['--allow-partial-checkpoint', '--out', str(results)])
    assert results.is_file()


def test_test_tool_evaluates_a_fitting_checkpoint(checkpoints, data_root, tmp_path):
    folder = checkpoints[0]
    results = tmp_path / 'results.pkl'
    load_tool('test.py').main([str(DET_CONFIG), str(folder / 'detector.pth'), '--work-dir',
                               str(tmp_path), '--out', str(results), '--cfg-options',
                               *data_options(DET_CONFIG, data_root)])
    assert results.is_file()


def test_inference_tool_stops_on_a_checkpoint_of_another_model(checkpoints, data_root,
                                                               tmp_path):
    folder = checkpoints[0]
    image = sorted((data_root / 'coco' / 'val').glob('*.jpg'))[0]
    out = tmp_path / 'drawn.png'
    argv = [str(DET_CONFIG), str(folder / 'segmentor.pth'), str(image), '--out', str(out)]
    with pytest.raises(SystemExit, match='does not fit the model'):
        load_tool('inference.py').main(argv)
    assert not out.exists()
    load_tool('inference.py').main(argv + ['--allow-partial-checkpoint'])
    assert out.is_file()


def test_load_from_that_fits_partly_warns_once_with_the_counts(checkpoints, tmp_path,
                                                               monkeypatch):
    folder = checkpoints[0]
    cfg = Config.fromfile(str(DET_CONFIG))
    cfg.work_dir = str(tmp_path)
    cfg.load_from = str(folder / 'segmentor.pth')
    runner = Runner.from_cfg(harden_train_config(cfg))
    logged = []
    monkeypatch.setattr(weights_match, 'print_log',
                        lambda msg, level=logging.INFO, **kwargs: logged.append((level, msg)))
    runner.load_or_resume()
    warnings = [msg for level, msg in logged if level == logging.WARNING]
    assert len(warnings) == 1 and 'fits the model only partly' in warnings[0]
    missing = sum(key not in torch.load(cfg.load_from, weights_only=True)['state_dict']
                  for key in runner.model.state_dict())
    assert f'{missing} missing (' in warnings[0] and ' unexpected (' in warnings[0]
