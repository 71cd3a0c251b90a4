from .checkpoint import (CorruptCheckpointError, UnsafeCheckpointError,
                         install_checkpoint_safety, load_local_checkpoint)

__all__ = [
    'CorruptCheckpointError', 'UnsafeCheckpointError', 'install_checkpoint_safety',
    'load_local_checkpoint'
]
