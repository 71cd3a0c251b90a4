"""Safe checkpoint loading and download, state-dict helpers, distributed set-up.

Layer: the bottom one; imports nothing else of the package.
"""
from .checkpoint import (CheckpointDownloadError, CorruptCheckpointError, UnsafeCheckpointError,
                         install_checkpoint_safety, load_checkpoint_file, load_from_local)
from .restricted_unpickler import ForeignObject
from .state_dict import StateDictMatch, match_state_dict, strip_prefix, unwrap_state_dict

__all__ = [
    'CheckpointDownloadError', 'CorruptCheckpointError', 'ForeignObject', 'StateDictMatch',
    'UnsafeCheckpointError', 'install_checkpoint_safety', 'load_checkpoint_file',
    'load_from_local', 'match_state_dict', 'strip_prefix', 'unwrap_state_dict'
]
