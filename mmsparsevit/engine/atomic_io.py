"""Crash-safe local writes for checkpoints.

mmengine's local backend writes a checkpoint in place (``open(path, 'wb')``), so a job killed
while saving leaves a truncated file under the final name. :class:`AtomicLocalBackend` writes
to a temporary file in the same folder, flushes it to disk and renames it over the target, so
the target is always either the old complete file or the new complete one.
"""
import os
import os.path as osp
import tempfile
from pathlib import Path
from typing import Union

from mmengine.fileio import LocalBackend, register_backend
from mmengine.utils import mkdir_or_exist

ATOMIC_BACKEND = 'local_atomic'
# Prefix of the temporary files: hidden, and never matched by a "*.pth" checkpoint scan.
TEMP_PREFIX = '.tmp-'

__all__ = ['ATOMIC_BACKEND', 'TEMP_PREFIX', 'AtomicLocalBackend', 'atomic_write_bytes']


def _fsync_directory(folder: str) -> None:
    """Persist a rename: the new directory entry is only durable once the folder is synced."""
    if not hasattr(os, 'O_DIRECTORY'):
        return
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_bytes(data: bytes, filepath: Union[str, Path]) -> None:
    """Write ``data`` to ``filepath`` so that no reader ever sees a partial file.

    The bytes go to a temporary file in the destination folder (same file system, so the
    rename is atomic), which is fsync'ed and then moved over ``filepath`` with
    :func:`os.replace`. On any failure the temporary file is removed and ``filepath`` is left
    as it was.

    Args:
        data (bytes): The file content.
        filepath (str | Path): Destination; missing parent folders are created.
    """
    filepath = osp.abspath(str(filepath))
    folder = osp.dirname(filepath)
    mkdir_or_exist(folder)
    descriptor, temp_path = tempfile.mkstemp(
        prefix=f'{TEMP_PREFIX}{osp.basename(filepath)}.', dir=folder)
    try:
        # mkstemp creates the file as 0600; give it the permissions open() would have.
        os.fchmod(descriptor, 0o666 & ~_current_umask())
        with os.fdopen(descriptor, 'wb') as temp_file:
            temp_file.write(data)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.replace(temp_path, filepath)
    except BaseException:
        if osp.exists(temp_path):
            os.remove(temp_path)
        raise
    _fsync_directory(folder)


class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend with atomic :meth:`put` and :meth:`put_text`.

    Select it with ``backend_args=dict(backend='local_atomic')`` (e.g. on ``CheckpointHook``);
    reads, listing and removal are the local backend's.
    """

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        atomic_write_bytes(obj, filepath)

    def put_text(self, obj: str, filepath: Union[str, Path], encoding: str = 'utf-8') -> None:
        atomic_write_bytes(obj.encode(encoding), filepath)


register_backend(ATOMIC_BACKEND, AtomicLocalBackend, force=True)
