"""mmsparsevit: efficient-attention vision transformers for OpenMMLab dense prediction.

The package is layered; a module imports only from its own layer and those below it
(``tests/test_layering.py`` checks every import):

- ``registry``, ``version``: leaves, importing nothing of ours; every layer may use them.
- ``utils``: safe checkpoint loading and download, state-dict helpers, distributed set-up.
- ``models``: backbones, their layers, dense-checkpoint conversion; imports ``utils``.
- ``datasets``: data checks (one walk through dataset wrappers, one set of COCO rules) and
  the per-sample check transform; may import ``models`` and ``utils``.
- ``engine``: hooks and guards of the training loop, atomic checkpoint IO, checkpoint fit;
  imports ``datasets`` (``DataAuditHook`` runs its audit), ``models`` and ``utils``.
- ``runtime``: what ``tools/train.py`` and ``tools/test.py`` run: CLI helpers, pre-flight
  checks, config hardening, resume selection; imports all of the above, and nothing in the
  package imports it.
- ``analysis`` (cost measurement, moving out of the package) may import ``models`` and
  ``utils``.
"""
from .utils.checkpoint import install_checkpoint_safety
from .version import __version__

install_checkpoint_safety()

__all__ = ['__version__']
