"""Pick the checkpoint that ``--resume`` (without a path) continues from.

mmengine resumes from the file named in ``<work_dir>/last_checkpoint`` and crashes when that
file is truncated or unreadable, although an older, complete checkpoint usually sits next to
it. :func:`find_resumable_checkpoint` tries the checkpoints newest first and returns the first
one that loads, warning about every one it skips.
"""
import glob
import logging
import os.path as osp
from typing import List, Optional, Tuple

from mmengine.logging import print_log

from ..engine.atomic_io import TEMP_PREFIX
from ..utils.checkpoint import CorruptCheckpointError, UnsafeCheckpointError, load_from_local
from .preflight import ConfigCheckError

LAST_CHECKPOINT_FILE = 'last_checkpoint'
# Keys mmengine's Runner.resume reads from a checkpoint.
_RESUME_KEYS = ('meta', 'state_dict')

__all__ = ['ResumeError', 'find_resumable_checkpoint', 'checkpoint_problem']


class ResumeError(ConfigCheckError):
    """Checkpoints exist in the work dir but none of them can be resumed from."""


def _recorded_latest(work_dir: str) -> Optional[str]:
    record = osp.join(work_dir, LAST_CHECKPOINT_FILE)
    if not osp.isfile(record):
        return None
    with open(record, encoding='utf-8') as f:
        return f.read().strip() or None


def _candidates(work_dir: str) -> List[str]:
    """The recorded latest checkpoint, then every ``*.pth`` beside it, newest first."""
    latest = _recorded_latest(work_dir)
    folders = {osp.abspath(work_dir)}
    if latest is not None and '://' not in latest:
        folders.add(osp.dirname(osp.abspath(latest)))
    found = {
        path
        for folder in folders for path in glob.glob(osp.join(folder, '*.pth'))
        if not osp.basename(path).startswith(TEMP_PREFIX)
    }
    ordered = sorted(found, key=lambda path: (osp.getmtime(path), path), reverse=True)
    if latest is not None:
        latest = osp.abspath(latest) if '://' not in latest else latest
        ordered = [latest] + [path for path in ordered if path != latest]
    return ordered


def checkpoint_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be resumed from, or None when it can.

    The file is loaded completely with the safe loader, so truncation anywhere, foreign files
    and files with pickled code are all caught.

    Args:
        path (str): A local checkpoint file.

    Returns:
        str | None: A short reason, or None for a resumable checkpoint.
    """
    try:
        checkpoint = load_from_local(path, map_location='cpu')
    except (FileNotFoundError, CorruptCheckpointError, UnsafeCheckpointError) as err:
        return str(err)
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in _RESUME_KEYS):
        keys = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint)
        return (f'checkpoint file {path} is not a training checkpoint (it lacks '
                f'{" and ".join(_RESUME_KEYS)}; it has {keys})')
    return None


def find_resumable_checkpoint(work_dir: str) -> Optional[str]:
    """The newest checkpoint in ``work_dir`` that loads, skipping broken ones with a warning.

    Args:
        work_dir (str): The run's work dir (where ``last_checkpoint`` is written).

    Returns:
        str | None: The checkpoint to resume from; None when the work dir holds no
        checkpoint at all (training starts from scratch, as with mmengine).

    Raises:
        ResumeError: Checkpoints exist but none is usable; the message lists every file with
            its problem.
    """
    skipped: List[Tuple[str, str]] = []
    for path in _candidates(work_dir):
        if '://' in path:
            return path  # remote checkpoints are left to mmengine's loaders
        problem = checkpoint_problem(path)
        if problem is None:
            if skipped:
                print_log(
                    f'--resume: resuming from {path}; skipped the newer but unusable '
                    f'{", ".join(name for name, _ in skipped)}',
                    logger='current', level=logging.WARNING)
            return path
        print_log(f'--resume: skipping {path}: {problem}', logger='current', level=logging.WARNING)
        skipped.append((path, problem))
    if skipped:
        listing = '; '.join(f'{path}: {problem}' for path, problem in skipped)
        raise ResumeError(
            f'--resume: no usable checkpoint in {work_dir} ({listing}). Pass --resume PATH '
            'to pick a checkpoint, or start without --resume (or with another --work-dir) '
            'to train from scratch.')
    return None
