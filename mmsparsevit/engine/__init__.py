"""Runtime robustness: atomic checkpoints, safe resume, loss and data guards.

Importing this package registers the ``local_atomic`` file backend, the hooks
``mmsparsevit.NonFiniteLossHook`` / ``mmsparsevit.DataAuditHook`` /
``mmsparsevit.WeightsMatchHook`` and the transform
``mmsparsevit.CheckLoadedSample``; :func:`mmsparsevit.runtime.harden_train_config` and
:func:`mmsparsevit.runtime.harden_test_config` switch them on for a run.
"""
from .atomic_io import ATOMIC_BACKEND, AtomicLocalBackend, atomic_write_bytes
from .data_audit import audit_coco_annotations, audit_dataset
from .hooks import DataAuditHook, NonFiniteLossError, NonFiniteLossHook, WeightsMatchHook
from .transforms import CheckLoadedSample, DataCheckError
from .weights_match import WeightsMismatchError, match_checkpoint_to_model

__all__ = [
    'ATOMIC_BACKEND', 'AtomicLocalBackend', 'atomic_write_bytes', 'audit_coco_annotations',
    'audit_dataset', 'DataAuditHook', 'NonFiniteLossError', 'NonFiniteLossHook',
    'CheckLoadedSample', 'DataCheckError', 'WeightsMatchHook', 'WeightsMismatchError',
    'match_checkpoint_to_model'
]
