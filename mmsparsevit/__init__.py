"""mmsparsevit: efficient-attention vision transformers for OpenMMLab dense prediction."""
from .version import __version__

__all__ = ['__version__']
