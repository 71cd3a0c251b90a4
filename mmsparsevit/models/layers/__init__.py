from .checkpointed_block import CheckpointedBlock
from .dtm import DeformableTokenMerging
from .knn_attention import knn_attention
from .knn_attention_modules import (KNNLITAttention, KNNLocallyGroupedSelfAttention,
                                    KNNMultiheadAttention, KNNTimmAttention, KNNWindowMSA)
from .lit_attention import LITAttention
from .lit_blocks import LITAttentionBlock, LITMLPBlock
from .shape_convert import nchw_to_nlc, nlc_to_nchw
from .vicinity_attention import VicinityAttention

__all__ = [
    'CheckpointedBlock', 'DeformableTokenMerging', 'KNNLITAttention',
    'KNNLocallyGroupedSelfAttention', 'KNNMultiheadAttention', 'KNNTimmAttention', 'KNNWindowMSA',
    'LITAttention', 'LITAttentionBlock', 'LITMLPBlock', 'VicinityAttention', 'knn_attention',
    'nchw_to_nlc', 'nlc_to_nchw'
]
