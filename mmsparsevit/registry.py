"""The mmsparsevit registry.

``MODELS`` is a child of mmengine's root registry with the scope ``mmsparsevit``. A config of
any OpenMMLab toolbox can therefore build this package's modules as
``type='mmsparsevit.<Name>'``; mmengine imports ``mmsparsevit.models`` (``locations``) on the
first such look-up, and names of root-level bricks (``'LN'``, ``'GELU'``, ``'DropPath'``) built
inside our modules resolve through the parent.
"""
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

MODELS = Registry(
    'model', parent=MMENGINE_MODELS, scope='mmsparsevit', locations=['mmsparsevit.models'])

__all__ = ['MODELS']
