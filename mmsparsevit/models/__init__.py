from .backbones import *  # noqa: F401,F403
from .dense_checkpoint import convert_dense_checkpoint  # noqa: F401
