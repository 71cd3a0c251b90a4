"""Backbones (VVT, LIT, KVT), their layers and the conversion of dense-prediction checkpoints.

Importing this package registers the backbones in :data:`mmsparsevit.registry.MODELS`.

Layer: imports only ``models`` and ``utils`` (and the ``registry`` leaf).
"""
from .backbones import *  # noqa: F401,F403
from .dense_checkpoint import convert_dense_checkpoint  # noqa: F401
