# Copyright (c) mmsparsevit contributors. All rights reserved.
"""``gelu_linear`` against autograd's ``F.linear(F.gelu(x))``.

No gradcheck: it runs backward repeatedly through one graph, which the overwritten
activation refuses by design (tested below)."""
import pytest
import torch
import torch.nn.functional as F

from mmsparsevit.models.layers.gelu_linear import gelu_linear


def inputs(shape=(2, 7, 6), out_features=5, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, dtype=dtype)
    weight = torch.randn(out_features, shape[-1], generator=gen, dtype=dtype)
    bias = torch.randn(out_features, generator=gen, dtype=dtype)
    return [tensor.requires_grad_() for tensor in (x, weight, bias)]


@pytest.mark.parametrize('approximate', ['none', 'tanh'])
@pytest.mark.parametrize('with_bias', [True, False])
def test_float32_outputs_and_gradients_equal_autograds(approximate, with_bias):
    """Same kernels on the same operands, so equal bit for bit in float32."""
    x, weight, bias = inputs(dtype=torch.float32)
    bias = bias if with_bias else None
    params = [t for t in (x, weight, bias) if t is not None]
    grad_out = torch.randn(2, 7, 5)
    fused = gelu_linear(x, weight, bias, approximate)
    plain = F.linear(F.gelu(x, approximate=approximate), weight, bias)
    assert fused.grad_fn is not None and 'GELULinear' in type(fused.grad_fn).__name__
    assert torch.equal(fused, plain)
    fused_grads = torch.autograd.grad(fused, params, grad_out)
    plain_grads = torch.autograd.grad(plain, params, grad_out)
    for got, expected in zip(fused_grads, plain_grads):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_non_contiguous_input_and_partial_gradients():
    x, weight, bias = inputs(shape=(2, 7, 6))
    x = x.detach().transpose(1, 2).contiguous().requires_grad_()
    x_view = x.transpose(1, 2)  # (2, 7, 6), not contiguous
    weight.requires_grad_(False)
    fused = gelu_linear(x_view, weight, bias)
    plain = F.linear(F.gelu(x_view), weight, bias)
    torch.testing.assert_close(fused, plain, rtol=1e-14, atol=1e-14)
    grad_out = torch.randn_like(fused)
    for got, expected in zip(torch.autograd.grad(fused, (x, bias), grad_out),
                             torch.autograd.grad(plain, (x, bias), grad_out)):
        torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-14)


def test_second_backward_through_the_overwritten_activation_is_refused():
    x, weight, bias = inputs()
    out = gelu_linear(x, weight, bias)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match='modified by an inplace operation'):
        out.sum().backward()


def test_plain_composition_outside_autograd_and_under_autocast():
    x, weight, bias = inputs(dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(gelu_linear(x, weight, bias), F.linear(F.gelu(x), weight, bias))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = gelu_linear(x, weight, bias)
    assert out.dtype == torch.bfloat16 and 'GELULinear' not in type(out.grad_fn).__name__
