from .dtm import DeformableTokenMerging
from .knn_attention import knn_attention
from .knn_attention_modules import (KNNLITAttention, KNNLocallyGroupedSelfAttention,
                                    KNNMultiheadAttention, KNNTimmAttention, KNNWindowMSA)
from .lit_attention import LITAttention
from .lit_blocks import LITAttentionBlock, LITMLPBlock
from .vicinity_attention import VicinityAttention

__all__ = [
    'knn_attention', 'KNNLITAttention', 'KNNLocallyGroupedSelfAttention',
    'KNNMultiheadAttention', 'KNNTimmAttention', 'KNNWindowMSA', 'DeformableTokenMerging',
    'LITAttention', 'LITAttentionBlock', 'LITMLPBlock', 'VicinityAttention']
