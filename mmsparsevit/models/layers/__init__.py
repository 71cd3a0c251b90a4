from .dtm import DeformableTokenMerging
from .knn_attention import knn_attention
from .lit_attention import LITAttention
from .lit_blocks import LITAttentionBlock, LITMLPBlock
from .vicinity_attention import VicinityAttention

__all__ = [
    'knn_attention',
    'DeformableTokenMerging', 'LITAttention', 'LITAttentionBlock', 'LITMLPBlock',
    'VicinityAttention']
