"""k-NN attention modules: built from the module they replace, same tensors and keys, same
outputs at full k, dropout only in training, unsupported options refused."""
import pytest
import torch
import torch.nn as nn

from mmsparsevit.models.layers.knn_attention_modules import (KNNLITAttention,
                                                             KNNMultiheadAttention)
from mmsparsevit.models.layers.lit_attention import LITAttention


def test_knn_modules_reproduce_the_modules_they_replace():
    torch.manual_seed(4)
    # batch_first and no biases: options the supported backbones do not use.
    mha = nn.MultiheadAttention(16, 2, bias=False, batch_first=True).eval()
    lit = LITAttention(16, 2, rel_pos_size=(3, 4)).eval()
    nn.init.normal_(lit.relative_position_bias_table)
    query, key = torch.randn(2, 12, 16), torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = mha(query, key, key)[0], lit(query, (3, 4))
        knn_mha, knn_lit = KNNMultiheadAttention(mha, 1.0), KNNLITAttention(lit, 12)
        outs = knn_mha(query, key, key)[0], knn_lit(query, (3, 4))
    for out, ref in zip(outs, expected):
        # float32, the same keys (k >= N); the wrapped modules' attention sums in another order
        # (measured 2.4e-7, 2 eps of the largest value).
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert knn_mha.in_proj_weight is mha.in_proj_weight and knn_mha.in_proj_bias is None
    assert knn_lit.relative_position_bias_table is lit.relative_position_bias_table
    assert list(knn_mha.state_dict()) == list(mha.state_dict())
    assert list(knn_lit.state_dict()) == list(lit.state_dict())


def test_attention_dropout_only_in_training():
    torch.manual_seed(5)
    attn = KNNLITAttention(LITAttention(16, 2, attn_drop_rate=0.5), 4)
    x = torch.randn(1, 10, 16)
    with torch.no_grad():
        first, second = attn(x, (2, 5)), attn(x, (2, 5))
        attn.eval()
        evaluated = attn(x, (2, 5)), attn(x, (2, 5))
    assert not torch.equal(first, second)
    torch.testing.assert_close(evaluated[0], evaluated[1], rtol=0, atol=0)


def test_unsupported_multihead_options_are_refused():
    with pytest.raises(TypeError, match='separate q/k/v'):
        KNNMultiheadAttention(nn.MultiheadAttention(8, 2, kdim=4), 0.5)
    for option in ('add_bias_kv', 'add_zero_attn'):
        with pytest.raises(TypeError, match='add_bias_kv or add_zero_attn'):
            KNNMultiheadAttention(nn.MultiheadAttention(8, 2, **{option: True}), 0.5)
    with pytest.raises(ValueError, match='chunk_size'):
        KNNMultiheadAttention(nn.MultiheadAttention(8, 2), 0.5, chunk_size=0)
    attn = KNNMultiheadAttention(nn.MultiheadAttention(8, 2), 0.5)
    x = torch.randn(3, 1, 8)
    with pytest.raises(ValueError, match='attn_mask'):
        attn(x, x, x, attn_mask=torch.zeros(3, 3, dtype=torch.bool))
