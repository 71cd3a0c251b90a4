"""Data checks: what a dataset's files must satisfy, and the transform that checks samples.

Importing this package registers the transform ``mmsparsevit.CheckLoadedSample``. The walk
through dataset wrappers (:func:`leaf_datasets`) and the rules of a COCO file
(:func:`check_coco_file`) exist once, here; the tools' pre-flight, the hardening of their
configs and ``DataAuditHook`` all use them.

Layer: may import ``models`` and ``utils`` (and the ``registry`` leaf); never ``engine`` or
``runtime``.
"""
from .data_checks import (DataCheckError, audit_coco_annotations, audit_dataset, check_coco_file,
                          leaf_datasets)
from .transforms import CheckLoadedSample

__all__ = [
    'CheckLoadedSample', 'DataCheckError', 'audit_coco_annotations', 'audit_dataset',
    'check_coco_file', 'leaf_datasets'
]
