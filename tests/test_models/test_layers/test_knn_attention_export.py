"""k-NN attention under ONNX export and torch.compile computes what it computes in eager."""
from unittest import mock

import pytest
import torch
from test_knn_attention import random_case  # sibling test module

from mmsparsevit.models.layers.knn_attention import knn_attention


def tied_case():
    """Integer queries and keys: integer logits, so many rows tie at their k-th largest."""
    generator = torch.Generator().manual_seed(1)
    query = torch.randint(-2, 3, (1, 2, 24, 4), generator=generator).double()
    key = torch.randint(-2, 3, (1, 2, 30, 4), generator=generator).double()
    return query, key


def in_onnx_export():
    return mock.patch.object(torch.onnx, 'is_in_onnx_export', return_value=True)


@pytest.mark.parametrize('topk', [1, 4, 0.25, 20, 40])
@pytest.mark.parametrize('masked', [False, True])
def test_export_path_equals_fast_path(topk, masked):
    query, key, value, bias, mask = (t.detach() if t is not None else t
                                     for t in random_case(masked=masked))
    fast = knn_attention(query, key, value, topk, scale=0.3, attn_bias=bias, attn_mask=mask,
                         chunk_size=5)
    with in_onnx_export():
        exported = knn_attention(query, key, value, topk, scale=0.3, attn_bias=bias,
                                 attn_mask=mask)
    # float64; the two paths only sum the softmax in different orders.
    torch.testing.assert_close(exported, fast, rtol=1e-12, atol=1e-12)


def test_export_path_keeps_the_tie_rule():
    query, key = tied_case()
    value = torch.eye(key.shape[-2], dtype=torch.float64).expand(1, 2, -1, -1)
    topk = 5
    fast = knn_attention(query, key, value, topk, scale=1.0, chunk_size=7)
    with in_onnx_export():
        exported = knn_attention(query, key, value, topk, scale=1.0)
    # One-hot values: the outputs are the attention weights, so ties show as extra keys.
    assert ((fast > 0).sum(-1) > topk).any()
    assert torch.equal(exported > 0, fast > 0)
    # float64; the two paths only sum the softmax in different orders.
    torch.testing.assert_close(exported, fast, rtol=1e-12, atol=1e-12)


def test_export_refuses_attention_dropout():
    query = torch.randn(1, 1, 8, 4)
    with in_onnx_export(), pytest.raises(ValueError, match='eval mode'):
        knn_attention(query, query, query, 3, dropout_p=0.1)


@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime(tmp_path):
    pytest.importorskip('onnx')
    onnxruntime = pytest.importorskip('onnxruntime')
    query, key, value, bias, mask = (t.detach().float() if t.is_floating_point() else t
                                     for t in random_case(num_queries=32, num_keys=32))

    class Attention(torch.nn.Module):

        def forward(self, query, key, value, bias):
            return knn_attention(query, key, value, 8, attn_bias=bias, attn_mask=mask,
                                 chunk_size=8)

    path = str(tmp_path / 'knn_attention.onnx')
    # The TorchScript exporter: the torch.export-based one needs onnxscript.
    torch.onnx.export(Attention(), (query, key, value, bias), path, dynamo=False)
    session = onnxruntime.InferenceSession(path)
    inputs = (query, key, value, bias)
    feeds = {arg.name: tensor.numpy() for arg, tensor in zip(session.get_inputs(), inputs)}
    (exported, ) = session.run(None, feeds)
    expected = Attention()(*inputs)
    # float32 rounding of two implementations (onnxruntime's kernels vs PyTorch's).
    torch.testing.assert_close(torch.from_numpy(exported), expected, rtol=1e-5, atol=1e-5)


def test_compiles_without_graph_breaks():
    query, key, value, bias, mask = (t.detach().float() if t.is_floating_point() else t
                                     for t in random_case(num_queries=20, num_keys=24))
    inputs = [t.requires_grad_() for t in (query, key, value, bias)]

    def attention(query, key, value, bias):
        return knn_attention(query, key, value, 6, attn_bias=bias, attn_mask=mask,
                             chunk_size=8)

    torch._dynamo.reset()
    # fullgraph=True raises at the first graph break; aot_eager also traces the backward.
    compiled = torch.compile(attention, fullgraph=True, backend='aot_eager')
    out = compiled(*inputs)
    grads = torch.autograd.grad(out.sum(), inputs)
    expected = attention(*inputs)
    expected_grads = torch.autograd.grad(expected.sum(), inputs)
    # aot_eager runs the same kernels; float32 default tolerances cover any decomposition.
    torch.testing.assert_close(out, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)
