# Copyright (c) mmsparsevit contributors. All rights reserved.
"""A SIGKILLed tools/train.py run resumes at the right iteration with its optimizer state."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import PARAM_SCHEDULERS
from mmengine.runner import CheckpointLoader
from robustness_utils import DET_CONFIG, REPO_ROOT, data_options, make_fixture_data, run_tool

import mmsparsevit  # noqa: F401  installs the checkpoint allow-list

pytestmark = pytest.mark.slow
WAIT_TIMEOUT_S = 400


def _uninterrupted_schedule(iterations):
    """Learning rates of iterations 1..n under the config's schedule, and its final state."""
    cfg = Config.fromfile(DET_CONFIG)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))],
                                lr=cfg.optim_wrapper.optimizer.lr)
    schedulers = [PARAM_SCHEDULERS.build(dict(scheduler, optimizer=optimizer))
                  for scheduler in cfg.param_scheduler]
    lrs = []
    for _ in range(iterations):
        lrs.append(optimizer.param_groups[0]['lr'])
        optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
    return lrs, [scheduler.state_dict() for scheduler in schedulers]


def _train_args(data_root, work_dir, max_iters):
    return [
        str(DET_CONFIG), '--work-dir', str(work_dir), '--cfg-options',
        *data_options(DET_CONFIG, data_root), f'train_cfg.max_iters={max_iters}',
        'train_cfg.val_interval=1000', 'default_hooks.checkpoint.interval=1',
        'default_hooks.checkpoint.max_keep_ckpts=3', 'default_hooks.logger.interval=1'
    ]


def _wait_for(condition, process, log):
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f'training ended early:\n{log.read_text()[-3000:]}')
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f'training made no progress:\n{log.read_text()[-3000:]}')
        time.sleep(0.05)


def _logged(work_dir):
    """(iteration, lr) of every logged training step, one list per run, in run order."""
    runs = []
    for scalars in sorted(work_dir.glob('*/vis_data/scalars.json')):
        records = [json.loads(line) for line in scalars.read_text().splitlines()]
        runs.append([(r['step'], r['lr']) for r in records if 'loss' in r])
    return runs


def test_sigkill_mid_run_then_resume(tmp_path):
    data_root = make_fixture_data(tmp_path / 'data', num_train=4, num_val=2)
    work_dir = tmp_path / 'work'
    log = tmp_path / 'first_run.log'
    record = work_dir / 'last_checkpoint'
    with open(log, 'w') as out:
        first = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / 'tools' / 'train.py'),
             *_train_args(data_root, work_dir, max_iters=100)],
            cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            # Kill as soon as iteration 3's checkpoint is recorded: iteration 4 is under way.
            _wait_for(lambda: record.is_file() and record.read_text().strip().endswith(
                'iter_3.pth'), first, log)
            os.kill(first.pid, signal.SIGKILL)
            assert first.wait(timeout=60) == -signal.SIGKILL
        finally:
            if first.poll() is None:
                first.kill()
                first.wait(timeout=60)
    saved = CheckpointLoader.load_checkpoint(str(work_dir / 'iter_3.pth'), map_location='cpu')
    assert saved['meta']['iter'] == 3
    assert not (work_dir / 'iter_4.pth').exists()
    # What a kill inside mmengine's own in-place save leaves: a torn iter_4 recorded as latest.
    good = (work_dir / 'iter_3.pth').read_bytes()
    (work_dir / 'iter_4.pth').write_bytes(good[:len(good) // 2])
    record.write_text(str(work_dir / 'iter_4.pth'))

    resumed = run_tool('train.py', [*_train_args(data_root, work_dir, max_iters=5), '--resume'])
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    torn = work_dir / 'iter_4.pth'
    assert f'--resume: skipping {torn}: checkpoint {torn} is truncated' in output
    assert f'resuming from {work_dir / "iter_3.pth"}' in output

    first_run, second_run = _logged(work_dir)
    assert [step for step, _ in first_run] == [1, 2, 3]
    assert [step for step, _ in second_run] == [4, 5]
    # The schedule continues where it stopped (a restarted one would begin at its first lr).
    lrs, scheduler_states = _uninterrupted_schedule(5)
    # Exactly: the same scheduler arithmetic on both sides, and JSON keeps every float's digits.
    assert [lr for _, lr in first_run + second_run] == lrs

    final = CheckpointLoader.load_checkpoint(str(work_dir / 'iter_5.pth'), map_location='cpu')
    assert final['meta']['iter'] == 5
    # AdamW counted every step, the three before the kill included: its state was restored.
    steps = {float(state['step']) for state in final['optimizer']['state'].values()}
    assert steps == {5.0}
    assert [s['last_step'] for s in final['param_schedulers']] == [
        s['last_step'] for s in scheduler_states]
    assert scheduler_states[0]['last_step'] == 5  # the warm-up, active throughout
    # The torn file was replaced atomically by the resumed run's own iteration-4 checkpoint.
    rewritten = CheckpointLoader.load_checkpoint(str(work_dir / 'iter_4.pth'),
                                                 map_location='cpu')
    assert rewritten['meta']['iter'] == 4
