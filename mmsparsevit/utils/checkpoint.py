"""Safe checkpoint loading for torch >= 2.6.

torch loads with ``weights_only=True`` by default, which refuses the few non-tensor objects that
mmengine 0.10 writes into its checkpoints (the message hub's ``HistoryBuffer`` and the numpy
arrays and scalars inside it), so ``--resume`` and ``tools/test.py`` fail on the toolkit's own
files. Instead of switching ``weights_only`` off, :func:`install_checkpoint_safety` allow-lists
exactly those classes and replaces mmengine's local-file loader with one that names the file and
the offending object when a checkpoint carries anything else.
"""
import os.path as osp
import pickle
import re
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

__all__ = [
    'CorruptCheckpointError', 'UnsafeCheckpointError', 'MMENGINE_CHECKPOINT_GLOBALS',
    'install_checkpoint_safety', 'load_local_checkpoint'
]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds pickled objects outside the allow-list."""


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
    raise pickle.UnpicklingError(
        f'Unsupported global: GLOBAL builtins.getattr on {owner!r}.{name}')


MMENGINE_CHECKPOINT_GLOBALS: List[Union[Any, Tuple[Any, str]]] = [
    HistoryBuffer, (_history_buffer_statistic, 'builtins.getattr'), *_numpy_globals()
]

_UNSUPPORTED_GLOBAL = re.compile(r'(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)')


def load_local_checkpoint(filename: str,
                          map_location: Optional[Union[str, torch.device, Dict]] = None) -> Any:
    """Load a local checkpoint with ``weights_only=True`` and the mmengine allow-list.

    The allow-list is registered by :func:`install_checkpoint_safety` (run on
    ``import mmsparsevit``).

    Args:
        filename (str): Path of the checkpoint file.
        map_location (str | torch.device | dict, optional): As for :func:`torch.load`.
            Defaults to None.

    Returns:
        The unpickled checkpoint (usually a dict).

    Raises:
        FileNotFoundError: ``filename`` does not exist.
        UnsafeCheckpointError: the file holds a pickled object that is not allow-listed (for
            example a payload that would run code); nothing of it is executed.
        CorruptCheckpointError: the file is truncated or not a torch checkpoint.
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'checkpoint file {filename} does not exist')
    try:
        return torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        message = str(err)
        found = _UNSUPPORTED_GLOBAL.search(message)
        if found is None:
            detail = message.split('WeightsUnpickler error:')[-1].split('Check the doc')[0]
            raise CorruptCheckpointError(
                f'checkpoint file {filename} is truncated or not a torch checkpoint '
                f'({" ".join(detail.split())})') from None
        culprit = found.group(1)
        raise UnsafeCheckpointError(
            f'refusing to load checkpoint {filename}: it contains a pickled object outside the '
            f'allow-list of tensors, containers and the classes mmengine stores ({culprit}). '
            'Loading it could execute arbitrary code; if you trust its origin, convert it to a '
            'plain state dict first.') from None
    except (RuntimeError, EOFError) as err:
        raise CorruptCheckpointError(
            f'checkpoint file {filename} is truncated or not a torch checkpoint ({err})') from None


def install_checkpoint_safety() -> None:
    """Allow-list mmengine's checkpoint classes and route local loads through our loader.

    The allow-list is registered globally too, so that every ``torch.load`` with the default
    ``weights_only=True`` (mmengine's URL and hub loaders) accepts mmengine's own files; that
    adds exactly these classes and turns nothing off.
    """
    torch.serialization.add_safe_globals(MMENGINE_CHECKPOINT_GLOBALS)
    CheckpointLoader.register_scheme(prefixes='', loader=load_local_checkpoint, force=True)
