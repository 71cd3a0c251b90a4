"""One safe loader behind every checkpoint scheme mmengine knows.

mmengine resolves a checkpoint name through :class:`CheckpointLoader`: a local path, an
``http(s)://`` URL, ``torchvision://`` / ``modelzoo://``, ``open-mmlab://`` /
``openmmlab://``, ``mmcls://``, ``pavi://`` and ``s3://`` / ``petrel://``. Its own loaders
unpickle remote files with ``weights_only=False`` (``torch.hub.load_state_dict_from_url``) or
a plain ``torch.load``. :func:`install_checkpoint_safety` (run on ``import mmsparsevit``)
replaces every one of them: remote files are fetched (downloads cached where torch.hub caches
and checked for length and SHA-256, see :mod:`.download`) and all bytes are then unpickled by
:func:`load_checkpoint_file`, with one allow-list: tensors, containers, the classes mmengine
writes into its own checkpoints, and whatever :func:`torch.serialization.add_safe_globals`
added. Objects of other classes come back as inert :class:`~.restricted_unpickler.ForeignObject`
data; anything that would call code outside the allow-list is refused
(:class:`UnsafeCheckpointError`).
"""
import io
import logging
import os
import os.path as osp
import pickle
import tempfile
import zipfile
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from mmengine.dist import barrier, get_dist_info
from mmengine.logging import HistoryBuffer, MMLogger, print_log
from mmengine.runner import checkpoint as mmengine_checkpoint
from mmengine.runner.checkpoint import CheckpointLoader

from . import restricted_unpickler
from .download import CheckpointDownloadError, cached_download
from .restricted_unpickler import UnsafeCheckpointError, find_foreign_objects

__all__ = [
    'CheckpointDownloadError', 'CorruptCheckpointError', 'UnsafeCheckpointError',
    'MMENGINE_CHECKPOINT_GLOBALS', 'install_checkpoint_safety', 'load_checkpoint_file',
    'load_from_local', 'load_from_http'
]

MapLocation = Optional[Union[str, torch.device, Dict, Callable]]


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file is truncated or is not a torch checkpoint at all."""


def _numpy_globals() -> List[Union[Any, Tuple[Any, str]]]:
    """The numpy objects an array or scalar pickles to, under numpy 2 and numpy 1 names."""
    multiarray = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray
    allowed: List[Union[Any, Tuple[Any, str]]] = [np.ndarray, np.dtype]
    for name in ('_reconstruct', 'scalar'):
        obj = getattr(multiarray, name)
        allowed.append((obj, f'numpy._core.multiarray.{name}'))
        allowed.append((obj, f'numpy.core.multiarray.{name}'))
    # Files written under numpy 2 pickle dtypes by their class (numpy.dtypes.Float64DType, ...).
    allowed.extend(type(np.dtype(code)) for code in '?bBhHiIlLqQefdgFDG')
    return allowed


# HistoryBuffer fills its registry of statistics lazily, in __init__; these are always there.
_BUILTIN_STATISTICS = frozenset({'min', 'max', 'current', 'mean'})


def _history_buffer_statistic(owner: Any, name: str) -> Any:
    """Stands in for ``getattr`` while unpickling.

    A ``HistoryBuffer`` pickles its statistics methods as ``getattr(HistoryBuffer, 'mean')``.
    Allowing the real ``getattr`` would let a file reach any attribute of any allowed object
    (a function's ``__globals__``, say), so only those registered methods are handed out.
    """
    statistics = _BUILTIN_STATISTICS.union(HistoryBuffer._statistics_methods)
    if owner is HistoryBuffer and name in statistics:
        return getattr(HistoryBuffer, name)
    raise UnsafeCheckpointError(f'a call of builtins.getattr on {owner!r}.{name}')


MMENGINE_CHECKPOINT_GLOBALS: List[Union[Any, Tuple[Any, str]]] = [
    HistoryBuffer, (_history_buffer_statistic, 'builtins.getattr'), *_numpy_globals()
]


def load_checkpoint_file(file: Union[str, io.BytesIO],
                         map_location: MapLocation = None,
                         source: Optional[str] = None) -> Any:
    """Unpickle a checkpoint with the allow-list; the one place where bytes become objects.

    Args:
        file (str | BytesIO): Path of a local file, or the bytes of one.
        map_location: As for :func:`torch.load`. Defaults to None.
        source (str, optional): What to call the checkpoint in messages (the URL it came
            from); defaults to the path.

    Returns:
        The checkpoint (usually a dict). Objects of classes outside the allow-list are
        :class:`~.restricted_unpickler.ForeignObject` placeholders; one log line names them.
        A config text under ``meta['config']`` (mmcv 1.x) is moved to
        ``meta['config_text']``, where mmengine's resume does not execute it.

    Raises:
        UnsafeCheckpointError: the file would call (or alter) something outside the
            allow-list, for example a payload that runs a command; nothing of it is executed.
        CorruptCheckpointError: the file is truncated or not a torch checkpoint.
    """
    source = source or str(file)
    try:
        if os.getenv('TORCH_FORCE_WEIGHTS_ONLY_LOAD', '0').lower() in ('1', 'y', 'yes', 'true'):
            # torch then refuses any pickle_module; its own weights_only path is stricter still.
            checkpoint = torch.load(file, map_location=map_location, weights_only=True)
        else:
            # weights_only=False only hands unpickling to restricted_unpickler, which admits
            # the same allow-list as weights_only=True and never imports a foreign class.
            checkpoint = torch.load(file, map_location=map_location, weights_only=False,
                                    pickle_module=restricted_unpickler)
    except UnsafeCheckpointError as error:
        raise UnsafeCheckpointError(
            f'refusing to load checkpoint {source}: it asks for {error}, which is outside the '
            'allow-list of tensors, containers and the classes mmengine stores; nothing of it '
            'was executed. If you trust its origin, convert it to a plain state dict '
            'first.') from None
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError,
            IndexError, KeyError, TypeError, AssertionError) as error:
        detail = ' '.join(str(error).split('Check the doc')[0].split())
        raise CorruptCheckpointError(
            f'checkpoint {source} is truncated or not a torch checkpoint ({detail})') from None
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    if isinstance(meta, dict) and 'config' in meta:
        # mmcv 1.x checkpoints keep their config's Python source here, and mmengine's
        # Runner.resume executes whatever text it finds under this key (Config.fromstring).
        meta['config_text'] = meta.pop('config')
    foreign = find_foreign_objects(checkpoint)
    if foreign:
        print_log(
            f'{source}: kept as inert data, not reconstructed (their classes are not on the '
            'allow-list): ' + ', '.join(f'{path} ({name})' for path, name in foreign),
            logger='current', level=logging.INFO)
    return checkpoint


def load_from_local(filename: str, map_location: MapLocation = None) -> Any:
    """Load a local checkpoint file (mmengine's ``''`` scheme).

    Raises:
        FileNotFoundError: ``filename`` does not exist.
        UnsafeCheckpointError, CorruptCheckpointError: see :func:`load_checkpoint_file`.
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'checkpoint file {filename} does not exist')
    return load_checkpoint_file(filename, map_location)


def load_from_http(url: str, map_location: MapLocation = None) -> Any:
    """Download (once, into torch.hub's cache) and load an ``http(s)://`` checkpoint.

    In a distributed run rank 0 downloads first and the other ranks load the cached file
    after a barrier, as mmengine does. The file name's hash prefix or a ``#sha256=`` fragment
    is checked (:func:`.download.cached_download`).
    """
    rank, world_size = get_dist_info()
    progress = rank == 0 and os.isatty(2)
    path = cached_download(url, progress=progress) if rank == 0 else None
    if world_size > 1:
        barrier()
        if rank > 0:
            path = cached_download(url)
    return load_checkpoint_file(path, map_location, source=url)


def _load_named(prefix: str, name: str, urls: Dict[str, str], map_location: MapLocation) -> Any:
    if name not in urls:
        raise KeyError(f'{prefix}{name} is not a known checkpoint name; '
                       f'known names include {sorted(urls)[:5]}')
    location = urls[name]
    if location.startswith(('http://', 'https://')):
        return load_from_http(location, map_location)
    # open-mmlab:// names may point to a file under MMENGINE_HOME.
    return load_from_local(osp.join(mmengine_checkpoint._get_mmengine_home(), location),
                           map_location)


def load_from_torchvision(filename: str, map_location: MapLocation = None) -> Any:
    """``torchvision://NAME`` (and the deprecated ``modelzoo://NAME``): torchvision's
    weights, by the URL table mmengine uses."""
    prefix = 'modelzoo://' if filename.startswith('modelzoo://') else 'torchvision://'
    return _load_named(prefix, filename[len(prefix):],
                       mmengine_checkpoint.get_torchvision_models(), map_location)


def load_from_openmmlab(filename: str, map_location: MapLocation = None) -> Any:
    """``open-mmlab://NAME`` / ``openmmlab://NAME`` by mmengine's table (and the user's
    ``$MMENGINE_HOME/open_mmlab.json``), deprecated names redirected as mmengine does."""
    prefix = 'open-mmlab://' if filename.startswith('open-mmlab://') else 'openmmlab://'
    name = filename[len(prefix):]
    name = mmengine_checkpoint.get_deprecated_model_names().get(name, name)
    return _load_named(prefix, name, mmengine_checkpoint.get_external_models(), map_location)


def load_from_mmcls(filename: str, map_location: MapLocation = None) -> Any:
    """``mmcls://NAME``: an mmpretrain classifier's backbone, by mmengine's table."""
    checkpoint = _load_named('mmcls://', filename[len('mmcls://'):],
                             mmengine_checkpoint.get_mmcls_models(), map_location)
    return mmengine_checkpoint._process_mmcls_checkpoint(checkpoint)


def load_from_pavi(filename: str, map_location: MapLocation = None) -> Any:
    """``pavi://PATH``: downloaded by pavi's model cloud client into a temporary folder."""
    try:
        from pavi import modelcloud
    except ImportError:
        raise ImportError(f'{filename}: loading from pavi:// needs the pavi package') from None
    model = modelcloud.get(filename[len('pavi://'):])
    with tempfile.TemporaryDirectory() as folder:
        path = osp.join(folder, model.name)
        model.download(path)
        return load_checkpoint_file(path, map_location, source=filename)


def load_from_ceph(filename: str, map_location: MapLocation = None,
                   backend: str = 'petrel') -> Any:
    """``s3://`` / ``petrel://`` (optionally ``NAME:s3://``) through mmengine's file
    backend."""
    file_backend = mmengine_checkpoint.get_file_backend(filename,
                                                        backend_args={'backend': backend})
    with io.BytesIO(file_backend.get(filename)) as buffer:
        return load_checkpoint_file(buffer, map_location, source=filename)


# Every scheme mmengine 0.10 registers, with the loader that replaces its own (named as
# mmengine's are: its log line reads the backend from the name after 'load_from_').
SCHEME_LOADERS: Tuple[Tuple[Union[str, Tuple[str, ...]], Callable], ...] = (
    ('', load_from_local),
    (('http://', 'https://'), load_from_http),
    (('modelzoo://', 'torchvision://'), load_from_torchvision),
    (('open-mmlab://', 'openmmlab://'), load_from_openmmlab),
    ('mmcls://', load_from_mmcls),
    ('pavi://', load_from_pavi),
    ((r'(\S+\:)?s3://', r'(\S+\:)?petrel://'), load_from_ceph),
)


def install_checkpoint_safety() -> None:
    """Allow-list mmengine's checkpoint classes and route every scheme through the safe
    loader.

    The allow-list is registered with torch too, so that a plain ``torch.load`` with its
    default ``weights_only=True`` accepts mmengine's own files; that adds exactly these
    classes and turns nothing off.
    """
    torch.serialization.add_safe_globals(MMENGINE_CHECKPOINT_GLOBALS)
    for prefixes, loader in SCHEME_LOADERS:
        CheckpointLoader.register_scheme(prefixes=prefixes, loader=loader, force=True)
    unreplaced = [prefix for prefix, loader in CheckpointLoader._schemes.items()
                  if loader.__module__ != __name__]
    if unreplaced:
        MMLogger.get_current_instance().warning(
            f'checkpoint schemes {unreplaced} were registered by another package after '
            'mmsparsevit and load without its allow-list')
