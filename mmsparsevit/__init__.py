"""mmsparsevit: efficient-attention vision transformers for OpenMMLab dense prediction."""
from .utils.checkpoint import install_checkpoint_safety
from .version import __version__

install_checkpoint_safety()

__all__ = ['__version__']
