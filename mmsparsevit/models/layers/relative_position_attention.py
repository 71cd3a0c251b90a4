# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Softmax attention over all tokens of a map with a relative-position bias, keys reversed.

Between query ``n = (y_n, x_n)`` and key ``m`` of an H x W map (row-major tokens) the bias is
``table[y_n - y_m + H - 1, x_n - x_m + W - 1]``, one (2H-1) x (2W-1) table per head. Indexed
by the reversed key ``m' = N - 1 - m`` (``y_m' = H - 1 - y_m``, ``x_m' = W - 1 - x_m``) it
is ``table[y_n + y_m', x_n + x_m']``: a strided view of the table (every stride positive),
so the bias needs neither an N x N index nor a gather, and the table's gradient sums the
logit gradients over the same overlapping windows (:func:`reversed_key_bias_adjoint`).
Reversing keys and values together leaves the attention unchanged (up to the order of its
sums).
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _map_shape(table: Tensor) -> Tuple[int, int]:
    """(H, W) of the map whose offsets a (heads, 2H-1, 2W-1) table covers."""
    return (table.shape[-2] + 1) // 2, (table.shape[-1] + 1) // 2


def reversed_key_bias(table: Tensor) -> Tensor:
    """The bias of every (query, reversed key) pair as a view of ``table``.

    Args:
        table (Tensor): Per-head offsets table of shape (heads, 2H-1, 2W-1).

    Returns:
        Tensor: View of shape (heads, H, W, H, W) whose entry ``[h, y, x, y', x']`` is the
        bias between query ``(y, x)`` and key ``(H - 1 - y', W - 1 - x')``.
    """
    height, width = _map_shape(table)
    heads_stride, row_stride, col_stride = table.stride()
    return table.as_strided((table.shape[0], height, width, height, width),
                            (heads_stride, row_stride, col_stride, row_stride, col_stride))


# Logit elements (over batch and heads) of one row chunk of the backward's softmax gradient;
# 2**20 float32 values are 4 MiB, a buffer the allocator keeps for reuse.
BACKWARD_CHUNK_ELEMENTS = 1 << 20


def _softmax_input_grad_into_probs(grad_out: Tensor, value: Tensor, probs: Tensor) -> Tensor:
    """The logits' gradient of ``probs @ value``, written over ``probs`` and returned.

    Row chunk by row chunk: the probabilities' gradient ``grad_out @ value^T`` of a chunk,
    then softmax's backward of it, which needs only that chunk's probabilities. No second
    (B, heads, N, N) tensor is allocated.
    """
    batch, heads, num_tokens, head_dims = grad_out.shape
    flat_probs = probs.view(batch * heads, num_tokens, num_tokens)
    flat_grad = grad_out.reshape(batch * heads, num_tokens, head_dims)
    value_t = value.reshape(batch * heads, num_tokens, head_dims).transpose(1, 2)
    rows = max(1, BACKWARD_CHUNK_ELEMENTS // (batch * heads * num_tokens))
    buffer = probs.new_empty(batch * heads * min(rows, num_tokens) * num_tokens)
    for start in range(0, num_tokens, rows):
        stop = min(start + rows, num_tokens)
        chunk = buffer[:batch * heads * (stop - start) * num_tokens].view(
            batch * heads, stop - start, num_tokens)
        torch.bmm(flat_grad[:, start:stop], value_t, out=chunk)
        chunk_probs = flat_probs[:, start:stop]
        torch.ops.aten._softmax_backward_data.out(
            chunk, chunk_probs, -1, probs.dtype, grad_input=chunk)
        chunk_probs.copy_(chunk)
    return probs


def reversed_key_bias_adjoint(grad_bias: Tensor, map_shape: Tuple[int, int]) -> Tensor:
    """The table's gradient from the gradient of :func:`reversed_key_bias`'s view.

    Entry ``[h, a, b]`` sums ``grad_bias[h, (y, x), (y', x')]`` over ``y + y' = a`` and
    ``x + x' = b``: first over the columns (one slice add per query column ``x``), then over
    the rows of that (H, H, 2W-1) partial sum. ``F.fold`` computes the same sums, more
    slowly on the CPU.

    Args:
        grad_bias (Tensor): (heads, N, N), query tokens by reversed key tokens, N = H * W.
        map_shape (tuple[int, int]): (H, W).

    Returns:
        Tensor: (heads, 2H-1, 2W-1).
    """
    height, width = map_shape
    heads = grad_bias.shape[0]
    grad = grad_bias.view(heads, height, width, height, width)
    over_columns = grad.new_zeros(heads, height, height, 2 * width - 1)
    for column in range(width):
        over_columns[..., column:column + width] += grad[:, :, column]
    table_grad = grad.new_zeros(heads, 2 * height - 1, 2 * width - 1)
    for row in range(height):
        table_grad[:, row:row + height] += over_columns[:, row]
    return table_grad


class _ReversedKeyBiasedAttention(torch.autograd.Function):
    """``softmax(scale * q k^T + bias) v`` for reversed keys, with one N x N buffer each way.

    The bias is copied into the logit buffer and the product accumulated onto it; softmax
    then runs in place, so forward allocates one (B, heads, N, N) tensor (the probabilities,
    saved for backward), and backward writes the logit gradient over the probabilities, row
    chunk by row chunk, allocating none. Autograd's composition of the same operators
    allocates five, and on the CPU a fresh allocation of that size is paid in page faults as
    well as in memory traffic. A second backward through the same graph is refused by
    autograd's in-place check (the probabilities are overwritten).
    """

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, table: Tensor,
                scale: float) -> Tensor:
        batch, heads, num_tokens, head_dims = query.shape
        height, width = _map_shape(table)
        scaled_query = query * scale
        probs = query.new_empty(batch, heads, num_tokens, num_tokens)
        probs.view(batch, heads, height, width, height, width).copy_(reversed_key_bias(table))
        probs.view(batch * heads, num_tokens, num_tokens).baddbmm_(
            scaled_query.reshape(batch * heads, num_tokens, head_dims),
            key.reshape(batch * heads, num_tokens, head_dims).transpose(1, 2))
        torch.ops.aten._softmax.out(probs, -1, False, out=probs)
        ctx.save_for_backward(scaled_query, key, value, probs)
        ctx.scale = scale
        ctx.map_shape = (height, width)
        return probs @ value

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        scaled_query, key, value, probs = ctx.saved_tensors
        need_query, need_key, need_value, need_table = ctx.needs_input_grad[:4]
        grad_value = probs.transpose(-2, -1) @ grad_out if need_value else None
        grad_logits = _softmax_input_grad_into_probs(grad_out, value, probs)
        grad_query = (grad_logits @ key).mul_(ctx.scale) if need_query else None
        grad_key = grad_logits.transpose(-2, -1) @ scaled_query if need_key else None
        grad_table = None
        if need_table:
            per_head = grad_logits.sum(0) if grad_logits.shape[0] > 1 else grad_logits[0]
            grad_table = reversed_key_bias_adjoint(per_head, ctx.map_shape)
        return grad_query, grad_key, grad_value, grad_table, None


def relative_position_attention(query: Tensor,
                                key: Tensor,
                                value: Tensor,
                                table: Tensor,
                                scale: float,
                                dropout_p: float = 0.) -> Tensor:
    """Softmax attention with the relative-position bias of ``table`` over an H x W map.

    When autograd records the call without dropout or autocast, the attention runs in
    :class:`_ReversedKeyBiasedAttention`; otherwise in ``F.scaled_dot_product_attention``
    (fused, never materialising the weights) with the bias copied out of its view.

    Args:
        query, key, value (Tensor): (B, heads, N, head_dims), N = H * W tokens in row-major
            order.
        table (Tensor): (heads, 2H-1, 2W-1) bias per offset (dy + H - 1, dx + W - 1).
        scale (float): Logit scale.
        dropout_p (float): Dropout on the attention weights. Defaults to 0.

    Returns:
        Tensor: (B, heads, N, head_dims).
    """
    key, value = key.flip(-2), value.flip(-2)
    device_type = query.device.type
    autocast = (torch.amp.is_autocast_available(device_type)
                and torch.is_autocast_enabled(device_type))
    records_grad = torch.is_grad_enabled() and any(
        tensor.requires_grad for tensor in (query, key, value, table))
    if records_grad and dropout_p == 0 and not autocast:
        return _ReversedKeyBiasedAttention.apply(query, key, value, table, scale)
    num_tokens = query.shape[-2]
    bias = reversed_key_bias(table).reshape(table.shape[0], num_tokens, num_tokens)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=bias.unsqueeze(0), dropout_p=dropout_p, scale=scale)
