"""A training run SIGKILLed mid-epoch and resumed ends with the weights, bit for bit, of the
same run never interrupted: single-process and two-process torchrun (CPU, gloo), with drop
path, random flips and a data worker, so every random generator and the sampler position must
be restored."""
import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import List

import pytest
import torch
from ddp_checks import (NUM_PROCS, TOOLS, make_coco_data, run_bounded, tool_env,
                        write_detector_config)
from mmengine.runner import CheckpointLoader

from mmsparsevit.engine.hooks.random_state_hook import RANDOM_STATES_KEY

pytestmark = pytest.mark.slow
MAX_ITERS = 6
# The run is killed once this iteration's checkpoint is recorded: with 8 images, 2 per batch
# and rank, the sampler is then inside a pass over the data (single process: 3 of 4 batches;
# two ranks: 1 of 2 batches of the second pass).
KILL_AFTER_ITER = 3
KILL_TIMEOUT_S = 240
# Every random draw of the run matters: drop path in the backbone, the pipeline's RandomFlip
# (prob 0.5) in one worker process per rank. Checkpoints every third iteration: under DDP the
# ranks share their generator states only for the saves they foresee, here iterations 3 and 6.
OPTIONS = [
    f'train_cfg.max_iters={MAX_ITERS}', 'model.backbone.drop_path_rate=0.2',
    'train_dataloader.num_workers=1', 'train_dataloader.persistent_workers=True',
    'default_hooks.checkpoint.interval=3', 'default_hooks.checkpoint.max_keep_ckpts=2'
]


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('bitwise_resume')
    data = make_coco_data(root / 'data')
    config = write_detector_config(root / 'retinanet_vvt_resume.py', data, root / 'probe',
                                   backbone='VVT', frozen_stages=-1)
    return root, config


def _command(config: Path, work_dir: Path, distributed: bool):
    env = tool_env()
    if distributed:
        return ['bash', str(TOOLS / 'dist_train.sh'), str(config), str(NUM_PROCS),
                '--work-dir', str(work_dir), '--cfg-options', *OPTIONS], env
    return [env['PYTHON'], str(TOOLS / 'train.py'), str(config), '--work-dir', str(work_dir),
            '--cfg-options', *OPTIONS], env


def _children(pid: int) -> List[int]:
    children = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            parent = int(stat.read_text().rsplit(')', 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while being read
        if parent == pid:
            children.append(int(stat.parent.name))
    return children


def _alive(pid: int) -> bool:
    try:
        state = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != 'Z'


def _kill_after_checkpoint(command, env, work_dir: Path, log_path: Path) -> None:
    """Run ``command`` until ``iter_<KILL_AFTER_ITER>.pth`` is recorded, then SIGKILL every
    process of the run at once: the launcher, and under torchrun each rank, which torchrun
    starts in a session of its own, with its data worker."""
    record = work_dir / 'last_checkpoint'
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + KILL_TIMEOUT_S
            while not (record.is_file() and record.read_text().strip().endswith(
                    f'iter_{KILL_AFTER_ITER}.pth')):
                assert proc.poll() is None, f'training ended early:\n{log_path.read_text()}'
                assert time.monotonic() < deadline, f'no progress:\n{log_path.read_text()}'
                time.sleep(0.05)
        finally:
            pids = [proc.pid, *_children(proc.pid)]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
            proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, 'the killed ranks did not end'
        time.sleep(0.05)
    assert not (work_dir / f'iter_{MAX_ITERS}.pth').exists(), 'killed too late'


def _final_checkpoint(work_dir: Path) -> dict:
    return CheckpointLoader.load_checkpoint(str(work_dir / f'iter_{MAX_ITERS}.pth'),
                                            map_location='cpu')


@pytest.mark.parametrize('distributed', [False, True], ids=['single', 'torchrun'])
def test_sigkill_then_resume_ends_bitwise_equal_to_the_uninterrupted_run(setup, distributed):
    root, config = setup
    name = 'torchrun' if distributed else 'single'
    uninterrupted, interrupted = root / f'{name}_uninterrupted', root / f'{name}_interrupted'
    command, env = _command(config, uninterrupted, distributed)
    run_bounded(command, env, root / f'{name}_uninterrupted.log')

    command, env = _command(config, interrupted, distributed)
    _kill_after_checkpoint(command, env, interrupted, root / f'{name}_killed.log')
    run_bounded(command + ['--resume'], env, root / f'{name}_resumed.log')
    replayed = re.search(r'Advance dataloader (\d+) steps',
                         (root / f'{name}_resumed.log').read_text())
    assert replayed and KILL_AFTER_ITER <= int(replayed.group(1)) < MAX_ITERS

    expected, resumed = _final_checkpoint(uninterrupted), _final_checkpoint(interrupted)
    world_size = NUM_PROCS if distributed else 1
    assert len(expected['meta'][RANDOM_STATES_KEY]) == world_size
    assert expected['state_dict'].keys() == resumed['state_dict'].keys()
    different = [name for name, tensor in expected['state_dict'].items()
                 if not torch.equal(tensor, resumed['state_dict'][name])]
    assert not different, f'{len(different)} tensors differ, e.g. {different[:5]}'
