"""k-NN attention: exact top-k semantics, masks, gradients, chunking, autocast, bad input."""
import pytest
import torch
import torch.nn.functional as F

from mmsparsevit.models.layers.knn_attention import (knn_attention, resolve_topk,
                                                     topk_per_stage)


def reference_knn_attention(query, key, value, topk, scale, attn_bias=None, attn_mask=None,
                            keep_ties=False):
    """Full logit matrix, everything outside each row's top-k set to -inf, softmax.

    ``keep_ties``: keep every key whose logit equals the row's k-th largest, the documented
    tie rule of :func:`knn_attention`; otherwise ``torch.topk``'s k (fine without ties).
    """
    logits = (query @ key.transpose(-2, -1)) * scale
    if attn_bias is not None:
        logits = logits + attn_bias
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float('-inf'))
    topk = min(topk, logits.shape[-1])
    if keep_ties:
        keep = logits >= logits.topk(topk, dim=-1).values[..., -1:]
    else:
        indices = logits.topk(topk, dim=-1).indices
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, indices, True)
    logits = logits.masked_fill(~keep, float('-inf'))
    return logits.softmax(dim=-1) @ value


def random_case(batch=2, heads=3, num_queries=37, num_keys=41, dims=8, dtype=torch.float64,
                masked=True, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_()

    query = randn(batch, heads, num_queries, dims)
    key = randn(batch, heads, num_keys, dims)
    value = randn(batch, heads, num_keys, dims + 3)
    bias = randn(heads, num_queries, num_keys)
    mask = None
    if masked:
        # Per-batch mask shared by heads; every query keeps at least key 0.
        mask = torch.rand(batch, 1, num_queries, num_keys, generator=generator) > 0.4
        mask[..., 0] = True
    return query, key, value, bias, mask


@pytest.mark.parametrize('topk', [1, 4, 0.25, 20, 40])
@pytest.mark.parametrize('chunk_size', [None, 5])
@pytest.mark.parametrize('masked', [False, True])
def test_matches_reference_outputs_and_gradients(topk, chunk_size, masked):
    query, key, value, bias, mask = random_case(masked=masked)
    scale = 0.3
    out = knn_attention(query, key, value, topk, scale=scale, attn_bias=bias, attn_mask=mask,
                        chunk_size=chunk_size)
    ref = reference_knn_attention(query, key, value, resolve_topk(topk, 41), scale, bias, mask)
    # Float64, no ties among random logits: the same keys, summed in another order
    # (measured 1.3e-15; float64 eps 2.2e-16 times sums of fewer than 100 terms of order 1
    # stays below 1e-13).
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)

    grad_out = torch.randn_like(out)
    inputs = (query, key, value, bias)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)
    for grad, ref_grad in zip(grads, ref_grads):
        # As the outputs (measured 2.7e-15).
        torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


def test_float32_matches_reference():
    query, key, value, bias, mask = (t.float() if t is not None and t.is_floating_point() else t
                                     for t in random_case(num_queries=64, num_keys=64))
    out = knn_attention(query, key, value, 16, scale=0.35, attn_bias=bias, attn_mask=mask,
                        chunk_size=10)
    ref = reference_knn_attention(query, key, value, 16, 0.35, bias, mask)
    # float32, the reference sums the softmax in another order: measured 7e-7 on values up
    # to 2 (3 eps of the largest).
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_selects_exactly_topk_keys():
    # With one-hot values, the output row is the attention distribution itself.
    num_keys = 30
    query = torch.randn(1, 1, 12, 4, dtype=torch.float64)
    key = torch.randn(1, 1, num_keys, 4, dtype=torch.float64)
    value = torch.eye(num_keys, dtype=torch.float64)[None, None]
    weights = knn_attention(query, key, value, 7)
    assert ((weights > 0).sum(-1) == 7).all()
    logits = query @ key.transpose(-2, -1)
    chosen = weights > 0
    top7 = torch.zeros_like(chosen).scatter(-1, logits.topk(7, dim=-1).indices, True)
    assert torch.equal(chosen, top7)
    # Seven float64 probabilities: a few eps (2.2e-16) of rounding each.
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 1, 12, dtype=torch.float64),
                               rtol=0, atol=1e-14)


def test_masked_keys_are_never_selected():
    # A forbidden key with a huge logit must not be chosen, and with fewer allowed keys
    # than k only the allowed ones count.
    num_keys = 10
    query = torch.randn(1, 1, 6, 4, dtype=torch.float64)
    key = torch.randn(1, 1, num_keys, 4, dtype=torch.float64)
    value = torch.eye(num_keys, dtype=torch.float64)[None, None]
    bias = torch.zeros(6, num_keys, dtype=torch.float64)
    bias[:, 5:] = 1e4
    allowed = torch.zeros(6, num_keys, dtype=torch.bool)
    allowed[:, :3] = True
    for topk in (2, 3, 8):
        weights = knn_attention(query, key, value, topk, attn_bias=bias, attn_mask=allowed)
        assert (weights[..., 3:] == 0).all()
        assert ((weights > 0).sum(-1) == min(topk, 3)).all()
    weights = knn_attention(query, key, value, 8, attn_bias=bias, attn_mask=allowed)
    logits = (query @ key.transpose(-2, -1)) * 0.5
    expected = logits[..., :3].softmax(-1)
    # Float64 round-off only (measured 1e-16).
    torch.testing.assert_close(weights[..., :3], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('topk', [41, 1000, 1.0])
def test_topk_covering_all_keys_is_dense_attention(topk):
    query, key, value, bias, mask = random_case(dtype=torch.float32)
    out = knn_attention(query, key, value, topk, scale=0.3, attn_bias=bias, attn_mask=mask)
    logits = (query @ key.transpose(-2, -1)) * 0.3 + bias
    dense = logits.masked_fill(~mask, float('-inf')).softmax(-1) @ value
    # float32, dense reference summed in another order: measured 5e-7 (2.4e-7 of the largest).
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-6)


def test_chunking_does_not_change_the_result():
    query, key, value, bias, mask = random_case(num_queries=50, dtype=torch.float32)
    outs = [knn_attention(query, key, value, 9, attn_bias=bias, attn_mask=mask, chunk_size=c)
            for c in (1, 7, 50, None)]
    for out in outs[1:]:
        # Chunks change the matmul blocking, so float32 rows round differently: measured 4.8e-7
        # (2 eps of the largest value).
        torch.testing.assert_close(out, outs[0], rtol=1e-6, atol=1e-6)


def test_gradcheck_float64():
    query, key, value, bias, mask = random_case(batch=1, heads=2, num_queries=9, num_keys=11,
                                                dims=4)
    mask = mask[:1]

    def fn(q, k, v, b):
        return knn_attention(q, k, v, 4, scale=0.7, attn_bias=b, attn_mask=mask, chunk_size=4)

    assert torch.autograd.gradcheck(fn, (query, key, value, bias))


def test_gradcheck_with_attention_dropout():
    query, key, value, bias, _ = random_case(batch=1, heads=2, num_queries=9, num_keys=11,
                                             dims=4)

    def fn(q, k, v, b):
        torch.manual_seed(0)  # the same dropout mask on every call
        return knn_attention(q, k, v, 5, attn_bias=b, dropout_p=0.3, chunk_size=4)

    out = fn(query, key, value, bias)
    assert (out != knn_attention(query, key, value, 5, attn_bias=bias)).any()
    assert torch.autograd.gradcheck(fn, (query, key, value, bias))


def test_no_quadratic_tensor_for_large_inputs():
    # Peak memory O(chunk * N): no op may see an N x N tensor, forward or backward.
    num = 1024
    query, key, value = (torch.randn(1, 1, num, 8, requires_grad=True) for _ in range(3))
    with torch.profiler.profile(record_shapes=True) as prof:
        knn_attention(query, key, value, num // 2, chunk_size=64).sum().backward()
    shapes = [shape for event in prof.events() for shape in event.input_shapes
              if isinstance(shape, list) and len(shape) >= 2]
    assert shapes, 'the profiler recorded no shapes'
    assert not [s for s in shapes if s[-1] == num and s[-2] == num]
    assert any(s[-2:] == [64, num] for s in shapes)


def test_autocast_cpu_bfloat16():
    # 16 dims: the scale 1/4 is a power of two, so scaling the query (the kernel) or the
    # logits (the reference) rounds identically: both select from the same bfloat16 logits,
    # the reference with the kernel's tie rule (8-bit mantissas make ties likelier).
    query, key, value, bias, mask = (t.float() if t is not None and t.is_floating_point() else t
                                     for t in random_case(num_queries=40, num_keys=40, dims=16))
    query, key, value, bias = (t.detach().requires_grad_() for t in (query, key, value, bias))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = knn_attention(query, key, value, 10, attn_bias=bias, attn_mask=mask)
        ref = reference_knn_attention(query, key, value, 10, 0.25, bias, mask, keep_ties=True)
    assert out.dtype == ref.dtype == torch.bfloat16
    out.float().sum().backward()
    for tensor in (query, key, value, bias):
        assert tensor.grad is not None and tensor.grad.dtype == torch.float32
        assert torch.isfinite(tensor.grad).all()
    # Same keys in every row, so only the value product differs: the kernel rounds the
    # unnormalised probabilities to bfloat16 and divides after it, the reference rounds the
    # normalised ones; each output is a convex combination of the values, so the two differ
    # by at most one bfloat16 rounding unit (eps / 2) of the largest value per head (measured:
    # 0.65 of it). With the scale 8**-0.5 rows differ by whole keys (up to 10 units).
    bound = torch.finfo(torch.bfloat16).eps / 2 * value.abs().amax(dim=(-2, -1), keepdim=True)
    assert ((out.float() - ref.float()).abs() <= bound).all()


@pytest.mark.parametrize('topk,num_keys,expected', [(5, 49, 5), (100, 49, 49), (0.5, 49, 25),
                                                    (0.7, 10, 7), (1.0, 3136, 3136),
                                                    (1e-4, 49, 1)])
def test_resolve_topk(topk, num_keys, expected):
    assert resolve_topk(topk, num_keys) == expected


@pytest.mark.parametrize('topk,error,match', [
    (0, ValueError, 'positive'),
    (-3, ValueError, 'positive'),
    (0.0, ValueError, r'\(0, 1\]'),
    (1.5, ValueError, r'\(0, 1\]'),
    (True, TypeError, 'int or a float'),
    ('half', TypeError, 'int or a float'),
])
def test_bad_topk(topk, error, match):
    query = torch.randn(1, 1, 4, 2)
    with pytest.raises(error, match=match):
        knn_attention(query, query, query, topk)


def test_bad_arguments():
    query = torch.randn(1, 2, 4, 2)
    with pytest.raises(ValueError, match='equal leading dims'):
        knn_attention(query, torch.randn(1, 3, 4, 2), torch.randn(1, 3, 4, 2), 2)
    with pytest.raises(TypeError, match='bool'):
        knn_attention(query, query, query, 2, attn_mask=torch.ones(4, 4))
    with pytest.raises(ValueError, match='attn_bias of shape'):
        knn_attention(query, query, query, 2, attn_bias=torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match='chunk_size'):
        knn_attention(query, query, query, 2, chunk_size=0)
    with pytest.raises(ValueError, match='dropout_p'):
        knn_attention(query, query, query, 2, dropout_p=1.0)


def test_topk_per_stage():
    assert topk_per_stage(0.5, 4) == (0.5, ) * 4
    assert topk_per_stage([1.0, 0.5, 10, 3], 4) == (1.0, 0.5, 10, 3)
    with pytest.raises(ValueError, match='needs 4 entries'):
        topk_per_stage([0.5, 0.5], 4)
    with pytest.raises(ValueError, match=r'topk\[1\]'):
        topk_per_stage([0.5, 1.5, 0.5, 0.5], 4)


def test_sdpa_path_matches_functional_attention():
    query, key, value = (torch.randn(2, 2, 16, 8) for _ in range(3))
    # Bitwise: at k = N the kernel hands the inputs to scaled_dot_product_attention itself.
    torch.testing.assert_close(
        knn_attention(query, key, value, 16), F.scaled_dot_product_attention(query, key, value),
        rtol=0, atol=0)
