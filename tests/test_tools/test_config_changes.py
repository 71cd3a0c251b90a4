# Copyright (c) mmsparsevit contributors. All rights reserved.
"""The tools log, when a run starts, every change their hardening made to the config."""
import logging
from functools import partial

import pytest
import torch
from tool_test_utils import DET_CONFIG, SEG_CONFIG, fixture_config, make_fixture_data

from mmsparsevit.runtime import cli, harden_test_config, harden_train_config
from mmsparsevit.runtime.config_diff import config_changes

CHECK = "dict(type='mmsparsevit.CheckLoadedSample')"
SEG_CHECK = "dict(type='mmsparsevit.CheckLoadedSample', num_classes=4, ignore_index=255)"


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return make_fixture_data(tmp_path_factory.mktemp('data'), num_train=2, num_val=1)


def test_changes_are_written_as_config_statements():
    before = dict(a=dict(b=1, c=[dict(type='X'), dict(type='Y'), dict(type='Z')]), gone=2,
                  hooks=[1])
    after = dict(a=dict(b=3, c=[dict(type='X'), dict(type='New'), dict(type='Y'),
                                dict(type='Z', k=(1, ))], d=None),
                 hooks=[1, 'x', 2.5], new={'not a name': [True]})
    assert config_changes(before, after) == [
        'a.b = 3  # was 1',
        "a.c.insert(1, dict(type='New'))",
        'a.c[3].k = (1,)',
        'a.d = None',
        "hooks += ['x', 2.5]",
        "new = {'not a name': [True]}",
        'del gone',
    ]
    assert config_changes(dict(x=[1, 2, 3]), dict(x=[1, 3])) == ['x = [1, 3]  # was [1, 2, 3]']
    assert config_changes(before, before) == []


def _logged_changes(monkeypatch, cfg, mode, harden):
    logged = []
    monkeypatch.setattr(cli, 'print_log',
                        lambda msg, *args, **kwargs: logged.append((msg, kwargs['logger'])))
    runner = cli.build_runner(cfg, mode, harden)
    assert len(logged) == 1 and logged[0][1] is runner.logger
    header, *lines = logged[0][0].splitlines()
    assert header == 'added by mmsparsevit (see docs/failure_behaviour.md):'
    return [line.strip() for line in lines]


def test_train_run_logs_each_addition_of_the_hardening(data_root, tmp_path, monkeypatch):
    cfg = fixture_config(DET_CONFIG, data_root, f'work_dir={tmp_path}')
    assert _logged_changes(monkeypatch, cfg, 'train', harden_train_config) == [
        f'train_dataloader.dataset.pipeline.insert(2, {CHECK})',
        f'val_dataloader.dataset.pipeline.insert(3, {CHECK})',
        f'test_dataloader.dataset.pipeline.insert(3, {CHECK})',
        "default_hooks.checkpoint.backend_args = dict(backend='local_atomic')",
        "custom_imports.imports += ['mmsparsevit.engine']",
        "custom_hooks = [dict(type='mmsparsevit.NonFiniteLossHook'), "
        "dict(type='mmsparsevit.DataAuditHook'), dict(type='mmsparsevit.RandomStateHook'), "
        "dict(type='mmsparsevit.WeightsMatchHook', allow_partial=True)]",
    ]


def test_train_run_with_a_resume_logs_the_checkpoint_it_picked(data_root, tmp_path,
                                                               monkeypatch):
    cfg = fixture_config(DET_CONFIG, data_root, f'work_dir={tmp_path}', 'resume=True')
    cfg.custom_hooks = [dict(type='mmsparsevit.NonFiniteLossHook', action='skip')]
    checkpoint = tmp_path / 'iter_2.pth'
    torch.save(dict(meta=dict(iter=2), state_dict={}), checkpoint)
    changes = _logged_changes(monkeypatch, cfg, 'train', harden_train_config)
    assert f"load_from = '{checkpoint}'  # was None" in changes
    # The config's own NonFiniteLossHook is kept; the others are appended after it.
    assert changes[-1] == ("custom_hooks += [dict(type='mmsparsevit.DataAuditHook'), "
                           "dict(type='mmsparsevit.RandomStateHook'), "
                           "dict(type='mmsparsevit.WeightsMatchHook', allow_partial=True)]")


def test_test_run_logs_each_addition_of_the_hardening(data_root, tmp_path, monkeypatch):
    cfg = fixture_config(SEG_CONFIG, data_root, f'work_dir={tmp_path}')
    harden = partial(harden_test_config, allow_partial_checkpoint=False)
    assert _logged_changes(monkeypatch, cfg, 'test', harden) == [
        f'test_dataloader.dataset.pipeline.insert(2, {SEG_CHECK})',
        "custom_imports.imports += ['mmsparsevit.engine']",
        "custom_hooks = [dict(type='mmsparsevit.WeightsMatchHook', allow_partial=False)]",
    ]


def test_the_changes_reach_the_run_log(data_root, tmp_path):
    cfg = fixture_config(DET_CONFIG, data_root, f'work_dir={tmp_path}')
    runner = cli.build_runner(cfg, 'train', harden_train_config)
    log_file = next(handler.baseFilename for handler in runner.logger.handlers
                    if isinstance(handler, logging.FileHandler))
    with open(log_file, encoding='utf-8') as f:
        log = f.read()
    assert 'added by mmsparsevit (see docs/failure_behaviour.md):\n' in log
    assert f'    train_dataloader.dataset.pipeline.insert(2, {CHECK})\n' in log
