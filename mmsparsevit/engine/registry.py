"""Registries for this package's runtime parts: hooks and data transforms.

Both are children of mmengine's roots with the scope ``mmsparsevit``, so mmdet and mmseg
configs reach them as ``type='mmsparsevit.<Name>'`` once ``mmsparsevit.engine`` is imported
(``custom_imports`` or ``locations``).
"""
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import TRANSFORMS as MMENGINE_TRANSFORMS
from mmengine.registry import Registry

HOOKS = Registry('hook', parent=MMENGINE_HOOKS, scope='mmsparsevit',
                 locations=['mmsparsevit.engine'])
TRANSFORMS = Registry('transform', parent=MMENGINE_TRANSFORMS, scope='mmsparsevit',
                      locations=['mmsparsevit.engine'])

__all__ = ['HOOKS', 'TRANSFORMS']
