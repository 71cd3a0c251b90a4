"""The mmsparsevit registries.

Each is a child of mmengine's root registry of its kind with the scope ``mmsparsevit``. A config
of any OpenMMLab toolbox can therefore build this package's modules as
``type='mmsparsevit.<Name>'``; mmengine imports the registry's ``locations`` on the first such
look-up, and names of root-level bricks (``'LN'``, ``'GELU'``, ``'DropPath'``) built inside our
modules resolve through the parent.

A leaf of the layering: imports only mmengine, so every layer may register into it.

- ``MODELS``: backbones (``mmsparsevit.models``).
- ``HOOKS``: the training and testing guards (``mmsparsevit.engine``).
- ``TRANSFORMS``: the per-sample data check (``mmsparsevit.datasets``).
"""
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import TRANSFORMS as MMENGINE_TRANSFORMS
from mmengine.registry import Registry

MODELS = Registry(
    'model', parent=MMENGINE_MODELS, scope='mmsparsevit', locations=['mmsparsevit.models'])
HOOKS = Registry(
    'hook', parent=MMENGINE_HOOKS, scope='mmsparsevit', locations=['mmsparsevit.engine'])
TRANSFORMS = Registry(
    'transform', parent=MMENGINE_TRANSFORMS, scope='mmsparsevit',
    locations=['mmsparsevit.datasets'])

__all__ = ['MODELS', 'HOOKS', 'TRANSFORMS']
