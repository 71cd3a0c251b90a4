"""Two-task DDP on CPU on a real one-node Slurm cluster: tools/slurm_train.sh through srun,
tools/slurm_test.sh through an sbatch job, both with --launcher slurm."""
import os
import subprocess
import time
from types import SimpleNamespace

import pytest
from ddp_checks import (NUM_PROCS, TOOLS, TRAIN_ITERS, assert_checkpoint_matches_ranks,
                        assert_ranks_took_part, coco_image_ids, make_coco_data, rank_records,
                        read_test_metrics, run_bounded, tool_env, write_detector_config)
from slurm_harness import PARTITION, LocalSlurmCluster, start_cluster_or_skip

from mmsparsevit.utils.dist import slurm_master_port

pytestmark = pytest.mark.slow
JOB_TIMEOUT_S = 240


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope='module')
def slurm_cluster(tmp_path_factory):
    cluster = start_cluster_or_skip(tmp_path_factory.mktemp('slurm') / 'cluster')
    started = cluster.started_pids
    yield cluster
    cluster.stop()
    alive = {name: pid for name, pid in started.items() if _pid_alive(pid)}
    assert not alive, f'daemons still running after stop(): {alive}'


def slurm_env(cluster: LocalSlurmCluster) -> dict:
    # One CPU per task: the CI node has two; GPUS_PER_NODE=0 requests no GPUs (no --gres).
    return tool_env(dict(GPUS=str(NUM_PROCS), GPUS_PER_NODE='0', CPUS_PER_TASK='1',
                         SRUN_ARGS='--time=10'), base=cluster.env())


@pytest.fixture(scope='module')
def slurm_training(slurm_cluster, tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp('slurm_train')
    data = make_coco_data(root / 'data')
    probe = root / 'probe'
    # VVT here (LIT runs in the torchrun test), nothing frozen.
    config = write_detector_config(root / 'retinanet_vvt_ddp.py', data, probe, backbone='VVT',
                                   frozen_stages=-1)
    work_dir = root / 'work'
    run_bounded(['bash', str(TOOLS / 'slurm_train.sh'), PARTITION, 'mmsv-ddp-train',
                 str(config), str(work_dir)], slurm_env(slurm_cluster), root / 'slurm_train.log')
    return SimpleNamespace(root=root, data=data, config=config, work_dir=work_dir,
                           records=rank_records(probe),
                           checkpoint=work_dir / f'iter_{TRAIN_ITERS}.pth')


def test_both_tasks_trained_on_their_own_shard(slurm_training):
    run = slurm_training
    assert_ranks_took_part(run.records, 'slurm',
                           coco_image_ids(run.data / 'annotations/instances_train.json'))
    # One job step, rendezvous on the port derived from its job id, not on 29500.
    job_ids = {r['slurm_job_id'] for r in run.records}
    assert len(job_ids) == 1 and None not in job_ids
    expected_port = slurm_master_port({'SLURM_JOB_ID': job_ids.pop(), 'SLURM_STEP_ID': '0'})
    assert {r['master_port'] for r in run.records} == {str(expected_port)}
    log = next(run.work_dir.glob('*/*.log')).read_text()
    assert 'Distributed launcher: slurm' in log
    assert f'Iter(train) [{TRAIN_ITERS}/{TRAIN_ITERS}]' in log


def test_checkpoint_holds_the_weights_of_every_task(slurm_training):
    assert_checkpoint_matches_ranks(slurm_training.records, slurm_training.checkpoint)


def wait_for_job(cluster: LocalSlurmCluster, job_id: str, timeout: float) -> dict:
    """Poll squeue until the job has left the queue; return its scontrol fields."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queued = subprocess.run(['squeue', '-h', '-j', job_id], env=cluster.env(),
                                capture_output=True, text=True, timeout=30)
        if not queued.stdout.strip():
            return cluster.job_state(job_id)
        time.sleep(0.5)
    subprocess.run(['scancel', job_id], env=cluster.env(), timeout=30)
    raise AssertionError(f'job {job_id} still queued or running after {timeout} s:\n'
                         f'{cluster.logs()}')


def test_sbatch_slurm_test_matches_single_process_test(slurm_cluster, slurm_training):
    run = slurm_training
    env = slurm_env(slurm_cluster)
    single_dir, batch_dir = run.root / 'test_single', run.root / 'test_sbatch'
    run_bounded([env['PYTHON'], str(TOOLS / 'test.py'), str(run.config), str(run.checkpoint),
                 '--work-dir', str(single_dir)], env, run.root / 'test_single.log')

    # The batch script of docs/distributed.md, cut down to one node and two CPU tasks.
    job_script = run.root / 'slurm_test.sbatch'
    job_script.write_text('\n'.join((
        '#!/usr/bin/env bash',
        f'#SBATCH --job-name=mmsv-ddp-test --partition={PARTITION}',
        f'#SBATCH --nodes=1 --ntasks={NUM_PROCS} --cpus-per-task=1 --time=10',
        f'#SBATCH --output={run.root}/sbatch-%j.out',
        f'bash {TOOLS}/slurm_test.sh {PARTITION} mmsv-ddp-test {run.config} {run.checkpoint} '
        f'--work-dir {batch_dir}',
        '')))
    submitted = subprocess.run(['sbatch', '--parsable', str(job_script)], env=env, cwd=run.root,
                               capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(';')[0]
    state = wait_for_job(slurm_cluster, job_id, JOB_TIMEOUT_S)
    output = (run.root / f'sbatch-{job_id}.out').read_text()
    assert state['JobState'] == 'COMPLETED' and state['ExitCode'] == '0:0', output[-6000:]
    assert state['NumTasks'] == str(NUM_PROCS)

    single, batch = read_test_metrics(single_dir), read_test_metrics(batch_dir)
    assert single == batch
    assert single['coco/bbox_mAP_50'] > 0, single


def test_harness_stops_exactly_the_daemons_it_started(slurm_cluster, tmp_path):
    """A second cluster (own ports and state) shares the running munged and must leave it,
    and the first cluster, alone when it stops."""
    second = start_cluster_or_skip(tmp_path / 'second')
    started = second.started_pids
    second.stop()
    assert set(started) == {'slurmctld', 'slurmd'}  # munged was already serving
    assert not any(_pid_alive(pid) for pid in started.values())
    assert all(_pid_alive(pid) for pid in slurm_cluster.started_pids.values())
    sinfo = subprocess.run(['sinfo', '-h', '-o', '%T'], env=slurm_cluster.env(),
                           capture_output=True, text=True, timeout=30)
    assert sinfo.stdout.split() == ['idle']
