"""Audit the training annotations once, before the first iteration."""
from mmengine.hooks import Hook

from ...datasets.data_checks import audit_dataset
from ...registry import HOOKS

__all__ = ['DataAuditHook']


@HOOKS.register_module()
class DataAuditHook(Hook):
    """Log what the dataset silently drops and stop on misread annotations.

    See :func:`mmsparsevit.datasets.audit_coco_annotations`. Runs on every rank, so
    that all ranks stop together on bad annotations; enabled by ``tools/train.py`` for every
    run.
    """

    priority = 'VERY_HIGH'

    def before_train(self, runner) -> None:
        audit_dataset(runner.train_dataloader.dataset)
