"""mmsparsevit.utils.dist: backend choice, Slurm ports and the CPU-only DDP set-up."""
import socket

import pytest
import torch.distributed as torch_dist
from mmengine.config import Config

from mmsparsevit.runtime.cli import run_reporting_input_errors
from mmsparsevit.utils.dist import (SLURM_PORT_BASE, SLURM_PORT_SPAN, resolve_dist_backend,
                                    setup_distributed, slurm_master_port)


@pytest.mark.parametrize('requested, cuda, expected', [
    (None, True, 'nccl'),
    ('auto', True, 'nccl'),
    (None, False, 'gloo'),
    ('auto', False, 'gloo'),
    ('nccl', True, 'nccl'),
    ('nccl', False, 'gloo'),
    ('gloo', True, 'gloo'),
    ('gloo', False, 'gloo'),
    ('mpi', False, 'mpi'),
])
def test_resolve_dist_backend(requested, cuda, expected):
    assert resolve_dist_backend(requested, cuda_available=cuda) == expected


def test_slurm_master_port_prefers_reserved_step_ports():
    env = {'SLURM_JOB_ID': '77', 'SLURM_STEP_RESV_PORTS': '12001-12003'}
    assert slurm_master_port(env) == 12001
    assert slurm_master_port({**env, 'SLURM_STEP_RESV_PORTS': '13005,13010-13011'}) == 13005


def test_slurm_master_port_differs_per_job_and_step():
    ports = {slurm_master_port({'SLURM_JOB_ID': str(job), 'SLURM_STEP_ID': str(step)})
             for job in range(100, 150) for step in range(4)}
    assert len(ports) == 200
    assert all(SLURM_PORT_BASE <= p < SLURM_PORT_BASE + SLURM_PORT_SPAN for p in ports)
    assert 29500 not in ports


def test_slurm_master_port_needs_a_job():
    with pytest.raises(KeyError, match='SLURM_JOB_ID'):
        slurm_master_port({})


def test_launcher_none_changes_nothing():
    cfg = Config(dict(env_cfg=dict(dist_cfg=dict(backend='nccl')),
                      model=dict(norm_cfg=dict(type='SyncBN'))))
    before = cfg.to_dict()
    setup_distributed(cfg, 'none')
    assert cfg.to_dict() == before
    with pytest.raises(ValueError, match='unknown launcher'):
        setup_distributed(cfg, 'torchrun')


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.fixture
def single_rank_env(monkeypatch):
    """A one-process ``--launcher pytorch`` world, as torchrun would export it."""
    for key, value in dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1',
                           MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(key, value)
    yield
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def test_cpu_setup_initialises_gloo_and_adapts_the_config(single_rank_env):
    cfg = Config(dict(
        env_cfg=dict(mp_cfg=dict(mp_start_method='fork'),
                     dist_cfg=dict(backend='nccl', timeout=60)),
        sync_bn='torch',
        find_unused_parameters=True,
        model=dict(
            type='EncoderDecoder',
            decode_head=dict(norm_cfg=dict(type='SyncBN', requires_grad=True)),
            auxiliary_head=[dict(norm_cfg=dict(type='MMSyncBN')), dict(norm_cfg=None)],
            backbone=dict(norm_cfg=dict(type='LN')))))
    setup_distributed(cfg, 'pytorch')

    assert torch_dist.is_initialized()
    assert torch_dist.get_backend() == 'gloo'
    assert cfg.env_cfg.dist_cfg == dict(backend='gloo', timeout=60)
    assert cfg.env_cfg.mp_cfg == dict(mp_start_method='fork')
    assert cfg.model.decode_head.norm_cfg == dict(type='BN', requires_grad=True)
    assert cfg.model.auxiliary_head[0].norm_cfg == dict(type='BN')
    assert cfg.model.auxiliary_head[1].norm_cfg is None
    assert cfg.model.backbone.norm_cfg == dict(type='LN')
    assert cfg.sync_bn is None
    assert cfg.model_wrapper_cfg == dict(type='MMDistributedDataParallel',
                                         broadcast_buffers=False, find_unused_parameters=True,
                                         device_ids=None)


def test_cpu_setup_keeps_a_custom_wrapper_and_an_explicit_backend(single_rank_env):
    cfg = Config(dict(env_cfg=dict(dist_cfg=dict(backend='gloo')),
                      model_wrapper_cfg=dict(type='MMDistributedDataParallel',
                                             find_unused_parameters=True,
                                             device_ids=[0]),
                      model=dict(type='RetinaNet')))
    setup_distributed(cfg, 'pytorch')
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    assert cfg.model_wrapper_cfg == dict(type='MMDistributedDataParallel',
                                         find_unused_parameters=True, device_ids=None)


def test_pytorch_launcher_outside_torchrun_is_a_clear_error(monkeypatch):
    for key in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(KeyError, match='torchrun'):
        setup_distributed(Config(dict(model=dict(type='RetinaNet'))), 'pytorch')


def test_tool_entry_point_destroys_the_process_group_it_ran_in(single_rank_env):
    """A finished rank must not leave its process group to the interpreter's exit (gloo's
    threads then abort the rank and Slurm cancels the other tasks)."""

    def job():
        setup_distributed(Config(dict(env_cfg=dict(dist_cfg=dict(backend='gloo')))), 'pytorch')
        assert torch_dist.is_initialized()
        return 'finished'

    assert run_reporting_input_errors(job) == 'finished'
    assert not torch_dist.is_initialized()

    def failing_job():
        setup_distributed(Config(dict(env_cfg=dict(dist_cfg=dict(backend='gloo')))), 'pytorch')
        raise RuntimeError('not an input error')

    with pytest.raises(RuntimeError, match='not an input error'):
        run_reporting_input_errors(failing_job)
    assert not torch_dist.is_initialized()


_CYCLE_SCRIPT = '''
import gc, os, weakref
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from mmsparsevit.utils.dist import release_distributed
os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=os.environ['TEST_PORT'])
dist.init_process_group('gloo', rank=0, world_size=1)
gc.disable()  # only an explicit collection may free the cycle, as between GC generations

class Runner:  # a finished runner in a reference cycle, holding its DDP-wrapped model
    pass

runner = Runner()
runner.self = runner
runner.model = DistributedDataParallel(torch.nn.Linear(2, 2))
runner.model(torch.ones(1, 2)).sum().backward()
wrapper = weakref.ref(runner.model)
del runner
release_distributed()
print('freed' if wrapper() is None else 'alive', dist.is_initialized())
'''


def test_release_frees_the_ddp_wrapper_of_a_finished_runner_before_the_exit(tmp_path):
    """The cause of 'terminate called without an active exception' at a rank's exit: the
    process group outlived destroy_process_group inside a DDP wrapper held by a cycle."""
    import subprocess
    import sys
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    result = subprocess.run([sys.executable, '-c', _CYCLE_SCRIPT], capture_output=True,
                            text=True, timeout=120, env={**__import__('os').environ,
                                                         'TEST_PORT': str(port)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ['freed', 'False']
