from .dtm import DeformableTokenMerging
from .knn_attention import knn_attention
from .lit_attention import LITAttention
from .lit_blocks import LITAttentionBlock, LITMLPBlock
from .shape_convert import nchw_to_nlc, nlc_to_nchw
from .vicinity_attention import VicinityAttention

__all__ = [
    'knn_attention', 'nchw_to_nlc', 'nlc_to_nchw',
    'DeformableTokenMerging', 'LITAttention', 'LITAttentionBlock', 'LITMLPBlock',
    'VicinityAttention']
