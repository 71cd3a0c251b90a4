# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Relative-position attention with reversed keys against the materialised formula."""
import pytest
import torch
import torch.nn.functional as F

from mmsparsevit.models.layers.relative_position_attention import (
    _ReversedKeyBiasedAttention, relative_position_attention, reversed_key_bias,
    reversed_key_bias_adjoint)


def natural_bias(table, height, width):
    """(heads, N, N) bias in the natural key order, by explicit loops over token pairs."""
    heads = table.shape[0]
    bias = table.new_empty(heads, height * width, height * width)
    for query in range(height * width):
        for key in range(height * width):
            dy = query // width - key // width
            dx = query % width - key % width
            bias[:, query, key] = table[:, dy + height - 1, dx + width - 1]
    return bias


def materialised_attention(query, key, value, table, scale):
    height, width = (table.shape[1] + 1) // 2, (table.shape[2] + 1) // 2
    logits = scale * query @ key.transpose(-2, -1) + natural_bias(table, height, width)
    return logits.softmax(dim=-1) @ value


def inputs(batch=2, heads=3, height=3, width=4, head_dims=5, requires_grad=True):
    gen = torch.Generator().manual_seed(0)
    tokens = height * width
    tensors = [torch.randn(batch, heads, tokens, head_dims, generator=gen, dtype=torch.float64)
               for _ in range(3)]
    tensors.append(torch.randn(heads, 2 * height - 1, 2 * width - 1, generator=gen,
                               dtype=torch.float64))
    return [tensor.requires_grad_(requires_grad) for tensor in tensors]


def test_reversed_key_bias_is_the_bias_of_the_reversed_key():
    height, width = 3, 4
    table = torch.arange(3 * 5 * 7, dtype=torch.float64).view(3, 5, 7)
    view = reversed_key_bias(table)
    assert view.data_ptr() == table.data_ptr()  # a view, nothing gathered
    view = view.reshape(3, 12, 12)
    # Reversing the key axis of the row-major tokens reverses both of its coordinates.
    assert torch.equal(view.flip(-1), natural_bias(table, height, width))


@pytest.mark.parametrize('height, width', [(3, 4), (5, 2), (1, 6)])
def test_adjoint_is_the_transpose_of_the_view(height, width):
    """<view(table), G> = <table, adjoint(G)> for every table and G, and the adjoint equals
    F.fold's sums over the same windows."""
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(3, 2 * height - 1, 2 * width - 1, generator=gen, dtype=torch.float64)
    grad = torch.randn(3, height * width, height * width, generator=gen, dtype=torch.float64)
    adjoint = reversed_key_bias_adjoint(grad, (height, width))
    view = reversed_key_bias(table).reshape(3, height * width, height * width)
    torch.testing.assert_close((view * grad).sum(), (table * adjoint).sum(), rtol=1e-13,
                               atol=0)
    folded = F.fold(grad.reshape(1, -1, height * width), table.shape[1:], (height, width))
    torch.testing.assert_close(adjoint, folded.view_as(table), rtol=1e-13, atol=1e-13)


def test_autograd_function_refuses_a_second_backward():
    """No gradcheck: it runs backward repeatedly through one graph, and backward writes the
    logit gradient over the saved probabilities."""
    query, key, value, table = inputs(batch=2, height=2, width=3, head_dims=2)
    out = _ReversedKeyBiasedAttention.apply(query, key, value, table, 0.7)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match='modified by an inplace operation'):
        out.sum().backward()


@pytest.mark.parametrize('chunk_elements', [1, 2 * 3 * 12 * 5, 1 << 20])
def test_backward_row_chunks_give_the_materialised_gradients(chunk_elements, monkeypatch):
    """One query row per chunk, five rows (the last chunk shorter), all rows at once."""
    from mmsparsevit.models.layers import relative_position_attention as module
    monkeypatch.setattr(module, 'BACKWARD_CHUNK_ELEMENTS', chunk_elements)
    query, key, value, table = inputs()
    out = relative_position_attention(query, key, value, table, 0.4)
    expected = materialised_attention(query, key, value, table, 0.4)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (query, key, value, table), grad_out)
    expected_grads = torch.autograd.grad(expected, (query, key, value, table), grad_out)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('grad_enabled', [True, False])
def test_equals_the_materialised_attention(grad_enabled):
    """The training path (autograd records) and the fused one (no grad) compute the
    materialised formula; float64, sums in another order: measured 4e-16 (outputs) and 5e-16
    (gradients, relative)."""
    query, key, value, table = inputs()
    with torch.set_grad_enabled(grad_enabled):
        out = relative_position_attention(query, key, value, table, 0.4)
    expected = materialised_attention(query, key, value, table, 0.4)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    if grad_enabled:
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, (query, key, value, table), grad_out)
        expected_grads = torch.autograd.grad(expected, (query, key, value, table), grad_out)
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


def test_frozen_table_gets_no_gradient():
    query, key, value, table = inputs()
    table.requires_grad_(False)
    out = relative_position_attention(query, key, value, table, 0.4)
    grads = torch.autograd.grad(out.sum(), (query, key, value))
    expected = materialised_attention(query, key, value, table, 0.4)
    expected_grads = torch.autograd.grad(expected.sum(), (query, key, value))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert table.grad is None


@pytest.mark.parametrize('case', ['dropout', 'autocast'])
def test_dropout_and_autocast_take_the_fused_kernel(case, monkeypatch):
    """The hand-written function has neither dropout nor autocast's casts; SDPA has both."""
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, 'scaled_dot_product_attention',
                        lambda *args, **kwargs: calls.append(kwargs) or sdpa(*args, **kwargs))
    query, key, value, table = (tensor.detach().float().requires_grad_() for tensor in inputs())
    if case == 'dropout':
        out = relative_position_attention(query, key, value, table, 0.4, dropout_p=0.5)
        assert calls[0]['dropout_p'] == 0.5
    else:
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = relative_position_attention(query, key, value, table, 0.4)
        assert out.dtype == torch.bfloat16
    assert len(calls) == 1
    out.float().sum().backward()
    assert all(tensor.grad is not None for tensor in (query, key, value, table))
