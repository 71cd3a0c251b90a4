"""Distributed set-up that works on GPU clusters and on CPU-only machines alike.

mmengine 0.10 assumes CUDA whenever a launcher is used: its ``init_dist`` calls
``torch.cuda.set_device`` (which raises on a machine without an NVIDIA driver), the default
``env_cfg.dist_cfg.backend`` of OpenMMLab configs is ``'nccl'``, the runner wraps the model with
``device_ids=[LOCAL_RANK]`` (which DDP rejects for a CPU module) and SyncBN refuses CPU tensors.
:func:`setup_distributed` resolves all of this once, before the runner is built, so that
``tools/train.py`` and ``tools/test.py`` run unchanged under torchrun, Slurm or MPI on either kind
of machine.

Backend resolution (``env_cfg.dist_cfg.backend``):

- missing, ``None`` or ``'auto'``: ``'nccl'`` when CUDA GPUs are visible, ``'gloo'`` otherwise;
- ``'nccl'`` without a visible CUDA GPU: ``'gloo'``, with a warning (NCCL only moves GPU tensors,
  and every OpenMMLab base runtime config asks for it);
- anything else (``'gloo'``, ``'mpi'``, ...): kept as given, e.g.
  ``--cfg-options env_cfg.dist_cfg.backend=gloo`` on a GPU node.
"""
import datetime
import gc
import logging
import os
import subprocess
from typing import Any, Dict, Mapping, MutableMapping, Optional

import torch.distributed as torch_dist
from mmengine.config import Config
from mmengine.device import get_device
from mmengine.logging import print_log
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS
from torch.nn.parallel import DistributedDataParallel

LAUNCHERS = ('none', 'pytorch', 'slurm', 'mpi')
# Slurm jobs get a rendezvous port from this range unless MASTER_PORT or reserved step ports say
# otherwise. It stays below Linux's ephemeral range (32768-60999) and above well-known services.
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 12000
# SyncBN layer names (mmcv's registry) that cannot run on CPU tensors.
SYNC_BN_TYPES = ('SyncBN', 'MMSyncBN')


def resolve_dist_backend(requested: Optional[str], cuda_available: bool) -> str:
    """Return the communication backend to use for ``requested``.

    Args:
        requested (str, optional): ``env_cfg.dist_cfg.backend`` from the config; ``None`` or
            ``'auto'`` picks one for the machine.
        cuda_available (bool): Whether CUDA GPUs are visible to this process.

    Returns:
        str: ``'nccl'`` or ``'gloo'`` for automatic choices, otherwise ``requested``.
    """
    if requested in (None, 'auto'):
        return 'nccl' if cuda_available else 'gloo'
    if requested == 'nccl' and not cuda_available:
        print_log(
            "env_cfg.dist_cfg.backend='nccl' needs CUDA GPUs but none is visible; using 'gloo'. "
            'Set env_cfg.dist_cfg.backend to choose another backend explicitly.',
            logger='current', level=logging.WARNING)
        return 'gloo'
    return requested


def slurm_master_port(environ: Mapping[str, str]) -> int:
    """Pick the rendezvous port of a Slurm job step when ``MASTER_PORT`` is not set.

    All tasks of a step compute the same value. A port range reserved for the step
    (``SLURM_STEP_RESV_PORTS``, from ``srun --resv-ports`` or ``MpiParams=ports=``) is used first;
    otherwise the port is derived from the job and step ids, so concurrent jobs on one node do
    not collide on torch's default 29500.

    Args:
        environ (Mapping[str, str]): The task's environment.

    Returns:
        int: The port for ``MASTER_PORT``.
    """
    reserved = environ.get('SLURM_STEP_RESV_PORTS', '')
    if reserved:
        return int(reserved.split(',')[0].split('-')[0])
    try:
        job_id = int(environ['SLURM_JOB_ID'])
    except (KeyError, ValueError) as error:
        raise KeyError('--launcher slurm needs SLURM_JOB_ID (run the script with srun) or an '
                       'explicit MASTER_PORT') from error
    step_id = int(environ.get('SLURM_STEP_ID', '0') or 0)
    return SLURM_PORT_BASE + (job_id * 16 + step_id % 16) % SLURM_PORT_SPAN


def _first_slurm_host(node_list: str) -> str:
    """Expand a Slurm node list (``node[01-04]``) and return its first host name."""
    result = subprocess.run(['scontrol', 'show', 'hostnames', node_list],
                            capture_output=True, text=True, check=True, timeout=60)
    return result.stdout.split()[0]


def _export_rank_env(launcher: str, environ: MutableMapping[str, str]) -> None:
    """Translate a launcher's variables into the ``env://`` ones torch reads."""
    if launcher == 'pytorch':
        missing = [k for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')
                   if k not in environ]
        if missing:
            raise KeyError(f'--launcher pytorch needs {missing} in the environment; start the '
                           'script with torchrun (tools/dist_train.sh)')
    elif launcher == 'slurm':
        environ['RANK'] = environ['SLURM_PROCID']
        environ['WORLD_SIZE'] = environ['SLURM_NTASKS']
        environ['LOCAL_RANK'] = environ.get('SLURM_LOCALID', '0')
        environ.setdefault('MASTER_ADDR', _first_slurm_host(environ['SLURM_NODELIST']))
    elif launcher == 'mpi':
        environ['RANK'] = environ['OMPI_COMM_WORLD_RANK']
        environ['WORLD_SIZE'] = environ['OMPI_COMM_WORLD_SIZE']
        environ['LOCAL_RANK'] = environ['OMPI_COMM_WORLD_LOCAL_RANK']
        if 'MASTER_ADDR' not in environ:
            raise KeyError('--launcher mpi needs MASTER_ADDR in the environment')
        environ.setdefault('MASTER_PORT', '29500')
    else:
        raise ValueError(f'unknown launcher {launcher!r}; expected one of {LAUNCHERS}')


def _replace_sync_bn(node: Any) -> int:
    """Turn SyncBN norm configs inside ``node`` into BN in place; return how many changed."""
    changed = 0
    if isinstance(node, MutableMapping):
        if node.get('type') in SYNC_BN_TYPES:
            node['type'] = 'BN'
            changed += 1
        for value in node.values():
            changed += _replace_sync_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            changed += _replace_sync_bn(value)
    return changed


def _cpu_model_wrapper_cfg(cfg: Config) -> Dict[str, Any]:
    """The runner's DDP wrapper config without device ids, which DDP forbids for CPU modules."""
    wrapper_cfg = cfg.get('model_wrapper_cfg')
    if wrapper_cfg is None:
        wrapper_cfg = dict(
            type=MMDistributedDataParallel.__name__,
            broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))
    wrapper_cfg = dict(wrapper_cfg)
    wrapper_type = wrapper_cfg.setdefault('type', MMDistributedDataParallel.__name__)
    wrapper_cls = MODEL_WRAPPERS.get(wrapper_type) if isinstance(wrapper_type, str) \
        else wrapper_type
    if wrapper_cls is not None and issubclass(wrapper_cls, DistributedDataParallel):
        wrapper_cfg['device_ids'] = None
    return wrapper_cfg


def setup_distributed(cfg: Config, launcher: str) -> None:
    """Prepare ``cfg`` and the process group for ``launcher`` on this machine's devices.

    Call it in a training or testing script after ``cfg.launcher`` is set and before
    ``Runner.from_cfg(cfg)``. With ``launcher='none'`` it does nothing. Otherwise it

    - resolves ``env_cfg.dist_cfg.backend`` (see the module docstring);
    - for Slurm, exports a ``MASTER_PORT`` unique to the job step unless one is set;
    - on a CPU-only machine, where mmengine's launchers would call CUDA, initialises the process
      group itself (the runner then reuses it), wraps the model in DDP without device ids and
      turns SyncBN layers (``norm_cfg=dict(type='SyncBN')``, ``cfg.sync_bn``) into plain BN,
      with a warning, because SyncBN only runs on GPUs.

    Args:
        cfg (Config): The full config; modified in place.
        launcher (str): One of ``'none'``, ``'pytorch'``, ``'slurm'``, ``'mpi'``.
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f'unknown launcher {launcher!r}; expected one of {LAUNCHERS}')
    if launcher == 'none':
        return
    if launcher == 'slurm' and 'MASTER_PORT' not in os.environ:
        os.environ['MASTER_PORT'] = str(slurm_master_port(os.environ))

    device = get_device()
    env_cfg = cfg.get('env_cfg') or {}
    dist_cfg = dict(env_cfg.get('dist_cfg') or {})
    dist_cfg['backend'] = resolve_dist_backend(
        dist_cfg.get('backend'), cuda_available=device == 'cuda')
    cfg.env_cfg = dict(env_cfg, dist_cfg=dist_cfg)
    if device != 'cpu':
        # mmengine's launchers handle CUDA (and NPU/MLU/MUSA, which pick their own backend).
        return

    replaced = _replace_sync_bn(cfg.get('model'))
    if cfg.get('sync_bn') is not None:
        cfg.sync_bn = None
        replaced += 1
    if replaced:
        print_log(f'SyncBN needs GPUs: {replaced} SyncBN setting(s) of the config run as BN on '
                  'this CPU-only machine', logger='current', level=logging.WARNING)
    cfg.model_wrapper_cfg = _cpu_model_wrapper_cfg(cfg)

    if not torch_dist.is_initialized():
        _export_rank_env(launcher, os.environ)
        init_kwargs = {k: v for k, v in dist_cfg.items() if k != 'backend'}
        if init_kwargs.get('timeout') is not None:
            init_kwargs['timeout'] = datetime.timedelta(seconds=init_kwargs['timeout'])
        torch_dist.init_process_group(backend=dist_cfg['backend'], **init_kwargs)


def release_distributed() -> None:
    """Free what holds the process group, then destroy it, if one was initialised.

    When a tool returns, its finished runner is still alive in a reference cycle, and with it
    the DDP wrapper whose reducer holds the process group. ``destroy_process_group`` only takes
    the group out of c10d's tables; the group itself (gloo's worker threads and their pending
    work, which holds tensors) would then be freed whenever the cyclic garbage collector next
    runs, possibly during interpreter finalisation, where that teardown aborts a rank that
    has finished its work ("terminate called without an active exception") and Slurm cancels
    the job's other tasks. Collecting first frees the wrapper while the interpreter is whole.
    """
    if torch_dist.is_available() and torch_dist.is_initialized():
        gc.collect()
        torch_dist.destroy_process_group()
