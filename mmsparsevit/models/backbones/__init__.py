from .base import SparseViTBackbone
from .kvt import build_kvt, convert_to_knn_attention
from .lit import LIT
from .vvt import VVT

__all__ = ['LIT', 'SparseViTBackbone', 'VVT', 'build_kvt', 'convert_to_knn_attention']
