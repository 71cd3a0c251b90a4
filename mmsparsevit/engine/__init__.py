"""Runtime robustness: atomic checkpoints, loss and gradient guards, checkpoint fit.

Importing this package registers the ``local_atomic`` file backend and the hooks
``mmsparsevit.NonFiniteLossHook`` / ``mmsparsevit.DataAuditHook`` /
``mmsparsevit.RandomStateHook`` / ``mmsparsevit.WeightsMatchHook``;
:func:`mmsparsevit.runtime.harden_train_config` and
:func:`mmsparsevit.runtime.harden_test_config` switch them on for a run.

Layer: may import ``datasets``, ``models`` and ``utils`` (and the ``registry`` leaf); never
``runtime``.
"""
from .atomic_io import ATOMIC_BACKEND, AtomicLocalBackend, atomic_write_bytes
from .hooks import (DataAuditHook, NonFiniteLossError, NonFiniteLossHook, RandomStateHook,
                    WeightsMatchHook)
from .weights_match import WeightsMismatchError, match_checkpoint_to_model

__all__ = [
    'ATOMIC_BACKEND', 'AtomicLocalBackend', 'atomic_write_bytes', 'DataAuditHook',
    'NonFiniteLossError', 'NonFiniteLossHook', 'RandomStateHook', 'WeightsMatchHook',
    'WeightsMismatchError', 'match_checkpoint_to_model'
]
