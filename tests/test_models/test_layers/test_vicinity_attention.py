"""VicinityAttention against a quadratic reference that builds the full N x N weights."""
import math

import pytest
import torch

from mmsparsevit.models.layers import VicinityAttention
from mmsparsevit.models.layers.vicinity_attention import (clamp_magnitude,
                                                          vicinity_position_features)


def vicinity_matrix(height, width, form, dtype=torch.float64):
    """Explicit (N, N) vicinity terms from token coordinates."""
    rows = torch.arange(height * width, dtype=dtype) // width
    cols = torch.arange(height * width, dtype=dtype) % width
    row_term = torch.cos(math.pi / 2 * (rows[:, None] - rows[None, :]) / height)
    col_term = torch.cos(math.pi / 2 * (cols[:, None] - cols[None, :]) / width)
    return row_term + col_term if form == 'sum' else row_term * col_term


def quadratic_attention(attn, x, hw_shape):
    """O(N^2) forward of ``attn`` (no magnitude clamping)."""
    batch, num_tokens, _ = x.shape
    heads = attn.num_heads

    def split(t):
        return t.view(batch, num_tokens, heads, -1).transpose(1, 2)

    q = split(attn.q_proj(x)).relu()
    k = split(attn.k_proj(x)).relu()
    v = split(attn.v_proj(x))
    weights = (q @ k.transpose(-2, -1)) * vicinity_matrix(*hw_shape, attn.position_form, x.dtype)
    out = (weights @ v) / (weights.sum(-1, keepdim=True) + attn.eps)
    out = attn.out_proj(out.transpose(1, 2).reshape(batch, num_tokens, -1))
    gate = torch.sigmoid(attn.se_expand(torch.relu(attn.se_reduce(x.mean(1))))).unsqueeze(1)
    return out * (1 + gate)


@pytest.mark.parametrize('form', ['sum', 'product'])
@pytest.mark.parametrize('feature_reduction,num_heads', [(1, 1), (2, 2), (2, 3), (4, 1)])
def test_linear_attention_equals_quadratic(form, feature_reduction, num_heads):
    torch.manual_seed(0)
    attn = VicinityAttention(
        24, num_heads, feature_reduction=feature_reduction, se_ratio=2, position_form=form,
        clamp_range=None).double()
    for hw_shape in [(5, 7), (1, 9), (6, 6)]:
        x = torch.randn(2, hw_shape[0] * hw_shape[1], 24, dtype=torch.float64)
        expected = quadratic_attention(attn, x, hw_shape)
        # Float64, another order of the same sums: measured 7e-16.
        torch.testing.assert_close(attn(x, hw_shape), expected, rtol=1e-12, atol=1e-12)


def test_clamped_attention_matches_quadratic_in_range():
    """With the default clamp, unclamped intermediates in range give the same result."""
    torch.manual_seed(1)
    attn = VicinityAttention(32, 2)
    x = torch.randn(2, 48, 32)
    clamped = attn(x, (6, 8))
    with torch.no_grad():
        reference = quadratic_attention(attn.double(), x.double(), (6, 8)).float()
    # float32 against a float64 reference: measured 2e-6 on values up to 0.7 (24 eps of the
    # largest), from sums over 48 tokens.
    torch.testing.assert_close(clamped, reference, rtol=1e-5, atol=1e-5)


def test_clamp_magnitude_keeps_sign_and_zeros():
    x = torch.tensor([-1e6, -2.0, -1e-7, 0.0, 3e-5, 0.5, 2e5])
    expected = torch.tensor([-1e4, -2.0, -1e-4, 0.0, 1e-4, 0.5, 1e4])
    # Exact: the clamped entries are the bounds themselves, the others unchanged.
    torch.testing.assert_close(clamp_magnitude(x.clone(), 1e-4, 1e4), expected, rtol=0, atol=0)
    leaf = x.clone().requires_grad_()
    out = clamp_magnitude(leaf, 1e-4, 1e4)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()
    # Identity inside the range, zero where the bound is active.
    torch.testing.assert_close(leaf.grad, torch.tensor([0., 1., 0., 0., 0., 1., 0.]), rtol=0,
                               atol=0)


def test_large_inputs_stay_bounded():
    torch.manual_seed(2)
    attn = VicinityAttention(16, 1)
    x = torch.randn(1, 64, 16) * 1e4
    out = attn(x, (8, 8))
    assert torch.isfinite(out).all()
    assert out.abs().max() <= 1e4


def test_gradients_reach_every_parameter():
    torch.manual_seed(3)
    attn = VicinityAttention(24, 3, se_ratio=4)
    x = torch.randn(2, 30, 24, requires_grad=True)
    attn(x, (5, 6)).pow(2).sum().backward()
    for name, param in attn.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_position_features_cached_per_size_device_dtype():
    vicinity_position_features.cache_clear()
    torch.manual_seed(4)
    attn = VicinityAttention(16, 2)
    x = torch.randn(1, 12, 16)
    attn(x, (3, 4))
    attn(x, (3, 4))
    attn(x.view(1, 12, 16), (4, 3))
    info = vicinity_position_features.cache_info()
    assert (info.misses, info.hits) == (2, 1)
    cpu = torch.device('cpu')
    first = vicinity_position_features(3, 4, 'sum', cpu, torch.float32)
    assert first is vicinity_position_features(3, 4, 'sum', cpu, torch.float32)
    assert first is not vicinity_position_features(3, 4, 'sum', cpu, torch.float64)
    assert not first.requires_grad
    # Inner products of the features are the vicinity terms.
    for form in ('sum', 'product'):
        features = vicinity_position_features(3, 4, form, cpu, torch.float64)
        # Float64 round-off only (measured 2e-16).
        torch.testing.assert_close(features @ features.T, vicinity_matrix(3, 4, form),
                                   rtol=1e-12, atol=1e-12)


def test_cache_filled_in_inference_mode_serves_training():
    vicinity_position_features.cache_clear()
    attn = VicinityAttention(16, 1)
    x = torch.randn(1, 20, 16)
    with torch.inference_mode():
        attn(x, (4, 5))
    attn(x.clone().requires_grad_(), (4, 5)).sum().backward()
    assert attn.q_proj.weight.grad is not None


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_matches_float32(dtype):
    torch.manual_seed(5)
    attn = VicinityAttention(64, 2)
    x = torch.randn(2, 1024, 64)
    expected = attn(x, (32, 32))
    with torch.autocast('cpu', dtype=dtype):
        out = attn(x, (32, 32))
    assert out.dtype == dtype
    # The input, the projections and the vicinity products round once each to the low
    # precision; independent roundings add in quadrature, measured 0.8 rounding units
    # (eps / 2) normwise for both dtypes; two units, i.e. one eps.
    tolerance = torch.finfo(dtype).eps
    assert (out.float() - expected).norm() / expected.norm() < tolerance


def test_float16_autocast_does_not_overflow():
    torch.manual_seed(6)
    attn = VicinityAttention(64, 2)
    x = torch.randn(1, 4096, 64) * 30
    with torch.autocast('cpu', dtype=torch.float16):
        key = attn.k_proj(x).relu()
        # The key-value product of this input overflows when formed in float16 ...
        assert not torch.isfinite(key.transpose(1, 2) @ attn.v_proj(x)).all()
        out = attn(x, (64, 64))
    # ... which the layer avoids by forming it in float32.
    assert torch.isfinite(out).all()
    reference = attn(x, (64, 64))
    assert (out.float() - reference).norm() / reference.norm() < 2e-2


@pytest.mark.parametrize('kwargs,match', [
    (dict(embed_dims=30, num_heads=4), 'divisible by num_heads'),
    (dict(embed_dims=24, num_heads=4, feature_reduction=4), 'feature_reduction'),
    (dict(embed_dims=24, num_heads=2, position_form='diagonal'), 'position_form'),
    (dict(embed_dims=24, num_heads=2, clamp_range=(1.0, 0.5)), 'clamp_range'),
    (dict(embed_dims=24, num_heads=2, se_ratio=0), 'se_ratio'),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VicinityAttention(**kwargs)


def test_token_shape_mismatch_is_reported():
    attn = VicinityAttention(16, 1)
    with pytest.raises(ValueError, match=r'hw_shape=\(4, 4\)'):
        attn(torch.randn(1, 15, 16), (4, 4))
