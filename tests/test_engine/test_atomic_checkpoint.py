# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Checkpoints are written atomically and --resume picks the newest readable one."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from mmengine.config import Config
from robustness_utils import DET_CONFIG, WritesFile, capture_warnings, load_tool, toy_runner

from mmsparsevit.engine import atomic_io, atomic_write_bytes
from mmsparsevit.runtime import (ResumeError, cli, find_resumable_checkpoint,
                                 harden_train_config, resume)

SUBPROCESS_TIMEOUT_S = 120


def _save(path, step):
    torch.save({'meta': {'iter': step}, 'state_dict': {'w': torch.full((4, ), float(step))},
                'optimizer': {}}, path)


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _record_latest(work_dir, path):
    (work_dir / 'last_checkpoint').write_text(str(path))


def test_atomic_write_replaces_and_keeps_umask_permissions(tmp_path):
    target = tmp_path / 'sub' / 'ckpt.pth'
    atomic_write_bytes(b'first', target)
    atomic_write_bytes(b'second', target)
    assert target.read_bytes() == b'second'
    assert sorted(os.listdir(target.parent)) == ['ckpt.pth']
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / 'ckpt.pth'
    target.write_bytes(b'good')

    def fail(*args):
        raise OSError('disk full')

    monkeypatch.setattr(atomic_io.os, 'replace', fail)
    with pytest.raises(OSError, match='disk full'):
        atomic_write_bytes(b'new content', target)
    assert target.read_bytes() == b'good'
    assert os.listdir(tmp_path) == ['ckpt.pth']


_KILLED_WRITER = textwrap.dedent('''
    import os, signal, sys
    from mmsparsevit.engine import atomic_io
    from mmengine.fileio import get_file_backend, LocalBackend

    def die(descriptor):  # the data is in the temporary file, the rename has not happened
        os.kill(os.getpid(), signal.SIGKILL)

    atomic_io.os.fsync = die
    backend = get_file_backend(sys.argv[1], backend_args=dict(backend=sys.argv[2]))
    backend.put(os.urandom(1 << 20), sys.argv[1])
''')


def test_kill_while_saving_leaves_the_previous_checkpoint_intact(tmp_path):
    target = tmp_path / 'iter_4.pth'
    _save(target, 4)
    good = target.read_bytes()
    result = subprocess.run([sys.executable, '-c', _KILLED_WRITER, str(target), 'local_atomic'],
                            timeout=SUBPROCESS_TIMEOUT_S, capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert target.read_bytes() == good
    leftovers = [name for name in os.listdir(tmp_path) if name != 'iter_4.pth']
    assert len(leftovers) == 1 and leftovers[0].startswith(atomic_io.TEMP_PREFIX)
    # The leftover is never mistaken for a checkpoint.
    _record_latest(tmp_path, target)
    assert find_resumable_checkpoint(str(tmp_path)) == str(target)


def test_runner_saves_checkpoints_through_the_atomic_writer(tmp_path, monkeypatch):
    renamed = []
    replace = os.replace
    monkeypatch.setattr(atomic_io.os, 'replace',
                        lambda src, dst: (renamed.append(dst), replace(src, dst))[1])
    cfg = harden_train_config(Config(dict(
        work_dir=str(tmp_path),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False)))))
    toy_runner(tmp_path, [(1., 2.)] * 4, max_iters=4, default_hooks=cfg.default_hooks,
               custom_hooks=cfg.custom_hooks).train()
    assert renamed == [str(tmp_path / 'iter_2.pth'), str(tmp_path / 'iter_4.pth')]


def test_resume_skips_a_truncated_latest_checkpoint_and_names_it(tmp_path, monkeypatch):
    logged = capture_warnings(monkeypatch, resume)
    older, newer = tmp_path / 'iter_2.pth', tmp_path / 'iter_4.pth'
    _save(older, 2)
    _save(newer, 4)
    _truncate(newer)
    _record_latest(tmp_path, newer)
    assert find_resumable_checkpoint(str(tmp_path)) == str(older)
    assert logged[0].startswith(f'--resume: skipping {newer}: checkpoint {newer} is '
                                'truncated or not a torch checkpoint')
    assert logged[1] == f'--resume: resuming from {older}; skipped the newer but unusable {newer}'


def test_resume_follows_last_checkpoint_then_newest_first(tmp_path):
    paths = [tmp_path / f'iter_{step}.pth' for step in (2, 4, 6)]
    for step, path in zip((2, 4, 6), paths):
        _save(path, step)
        os.utime(path, (step, step))
    assert find_resumable_checkpoint(str(tmp_path)) == str(paths[2])
    _record_latest(tmp_path, paths[0])
    assert find_resumable_checkpoint(str(tmp_path)) == str(paths[0])
    # A recorded checkpoint that was deleted, or an empty record, falls back to the newest.
    _record_latest(tmp_path, tmp_path / 'iter_8.pth')
    assert find_resumable_checkpoint(str(tmp_path)) == str(paths[2])
    (tmp_path / 'last_checkpoint').write_text('')
    assert find_resumable_checkpoint(str(tmp_path)) == str(paths[2])


def test_resume_skips_weights_only_files_and_payloads(tmp_path):
    good = tmp_path / 'iter_2.pth'
    _save(good, 2)
    os.utime(good, (1, 1))
    torch.save({'state_dict': {'w': torch.ones(1)}}, tmp_path / 'published.pth')
    sentinel = tmp_path / 'payload_ran'
    torch.save({'meta': WritesFile(sentinel), 'state_dict': {}}, tmp_path / 'evil.pth')
    assert find_resumable_checkpoint(str(tmp_path)) == str(good)
    assert not sentinel.exists()


def test_resume_without_checkpoints_starts_from_scratch(tmp_path):
    assert find_resumable_checkpoint(str(tmp_path)) is None


def test_train_tool_reports_a_work_dir_of_unusable_checkpoints(tmp_path):
    for step in (2, 4):
        _save(tmp_path / f'iter_{step}.pth', step)
        _truncate(tmp_path / f'iter_{step}.pth', keep=0.3)
    (tmp_path / 'iter_6.pth').write_bytes(b'')
    _record_latest(tmp_path, tmp_path / 'iter_6.pth')
    with pytest.raises(ResumeError) as raised:
        harden_train_config(Config(dict(work_dir=str(tmp_path), resume=True, load_from=None)))
    for step in (2, 4, 6):
        assert str(tmp_path / f'iter_{step}.pth') in str(raised.value)
    train_tool = load_tool('train.py')
    with pytest.raises(SystemExit) as exited:
        train_tool.main([str(DET_CONFIG), '--work-dir', str(tmp_path), '--resume'])
    message = str(exited.value.code)
    assert message.startswith(f'error: --resume: no usable checkpoint in {tmp_path} (')
    assert 'Pass --resume PATH' in message


def test_train_tool_runs_every_config_hardened(tmp_path, monkeypatch):
    train_tool = load_tool('train.py')
    built = []

    def capture(cfg, mode):
        built.append(cfg)
        raise SystemExit(0)

    # build_runner hardens the config, then checks it: capture it there.
    monkeypatch.setattr(cli, 'check_config', capture)
    with pytest.raises(SystemExit):
        train_tool.main([str(DET_CONFIG), '--work-dir', str(tmp_path)])
    cfg = built[0]
    assert cfg.default_hooks.checkpoint.backend_args == dict(backend='local_atomic')
    assert [hook['type'] for hook in cfg.custom_hooks] == [
        'mmsparsevit.NonFiniteLossHook', 'mmsparsevit.DataAuditHook',
        'mmsparsevit.RandomStateHook', 'mmsparsevit.WeightsMatchHook']
    assert 'mmsparsevit.engine' in cfg.custom_imports.imports
    assert dict(type='mmsparsevit.CheckLoadedSample') in cfg.train_dataloader.dataset.pipeline
