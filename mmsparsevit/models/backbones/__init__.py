from .base import SparseViTBackbone
from .kvt import KVT
from .lit import LIT
from .vvt import VVT

__all__ = ['KVT', 'LIT', 'SparseViTBackbone', 'VVT']
