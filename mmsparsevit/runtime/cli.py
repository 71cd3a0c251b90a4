# Copyright (c) mmsparsevit contributors. All rights reserved.
"""What ``tools/train.py`` and ``tools/test.py`` share: options, config loading, hardening,
errors."""
import argparse
import os
import os.path as osp
import sys
from typing import Callable, TypeVar

from mmengine.config import Config, DictAction
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from ..datasets.data_checks import DataCheckError
from ..engine.weights_match import WeightsMismatchError
from ..utils.checkpoint import CheckpointDownloadError
from ..utils.dist import release_distributed, setup_distributed
from .config_diff import config_changes
from .preflight import ConfigCheckError, check_config, describe_data_error

Result = TypeVar('Result')


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--work-dir``, ``--cfg-options``, ``--launcher`` and ``--local-rank``."""
    parser.add_argument('--work-dir', help='the folder for logs, checkpoints and metrics')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings in the config, key=value pairs; e.g. '
        'model.backbone.type=mmsparsevit.VVT model.neck.in_channels="[96,160,320,512]"')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    # torch.distributed.launch passes --local_rank; torchrun sets LOCAL_RANK itself.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse_common(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, export ``LOCAL_RANK`` and stop early when the config file is missing."""
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    if not osp.isfile(args.config):
        parser.error(f'config file {args.config} does not exist')
    return args


def load_config(args: argparse.Namespace) -> Config:
    """Read the config and apply ``--launcher``, ``--cfg-options`` and ``--work-dir``.

    The work dir is taken from the command line, else from the config, else
    ``./work_dirs/<config name>``.
    """
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    return cfg


def build_runner(cfg: Config, mode: str, harden: Callable[[Config], Config]) -> Runner:
    """Harden the config, check it and build the runner; log what the hardening changed.

    ``harden`` (:func:`~.hardening.harden_train_config` or
    :func:`~.hardening.harden_test_config`) gives the config this package's failure
    behaviour; then the config's data and channels are checked (:func:`check_config`),
    distributed training is prepared for ``cfg.launcher`` (:func:`setup_distributed`) and the
    runner is built. Rank 0 then logs, after mmengine's own print of the config, every change
    the hardening made (:func:`~.config_diff.config_changes`), so that nothing the tools add
    goes unseen.

    Args:
        cfg (Config): The merged config with the command line applied; changed in place.
        mode (str): ``'train'`` or ``'test'``, the data :func:`check_config` checks.
        harden (Callable[[Config], Config]): Changes the config in place.

    Returns:
        Runner: The runner, not yet started.
    """
    unhardened = cfg.to_dict()
    harden(cfg)
    changes = config_changes(unhardened, cfg.to_dict())
    check_config(cfg, mode)
    setup_distributed(cfg, cfg.get('launcher', 'none'))
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    if changes and runner.rank == 0:
        print_log('added by mmsparsevit (see docs/failure_behaviour.md):\n' +
                  '\n'.join(f'    {change}' for change in changes), logger=runner.logger)
    return runner


def run_reporting_input_errors(job: Callable[[], Result]) -> Result:
    """Run ``job``; exit with a one-line message when the input is at fault.

    :class:`ConfigCheckError`, a :class:`~mmsparsevit.datasets.DataCheckError`, a checkpoint
    that does not fit the model or cannot be downloaded, and errors that
    :func:`describe_data_error` recognises end the process with ``error: ...`` on stderr and
    exit code 1; anything else propagates with its traceback. Either way the distributed
    process group, if ``job`` created one, is destroyed before returning
    (:func:`release_distributed`).
    """
    try:
        return job()
    except (ConfigCheckError, DataCheckError, WeightsMismatchError,
            CheckpointDownloadError) as err:
        sys.exit(f'error: {err}')
    except Exception as err:
        message = describe_data_error(err)
        if message is None:
            raise
        sys.exit(f'error: {message}')
    finally:
        release_distributed()
