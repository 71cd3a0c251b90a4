# Copyright (c) mmsparsevit contributors. All rights reserved.
"""k-NN attention from "KVT: k-NN Attention for Boosting Vision Transformers".

Each query attends only to the ``k`` keys with the largest attention logits (after scaling,
after any additive bias such as Swin's relative-position bias, and never to a key that the
boolean attention mask forbids); the softmax is taken over those ``k`` keys only.

The authors' formulation (damo-cv/KVT) materialises an ``N x N`` float mask, scatters the
top-k indices into it and replaces everything else with ``-inf``. Here the same result is
computed without any ``N x N`` tensor: queries are processed in chunks, the selection is the
comparison ``logit >= k-th largest logit of the row``, and a custom autograd function keeps
only the row thresholds and log-sum-exps for the backward pass, where each chunk's logits are
recomputed (as in memory-efficient/flash attention). Peak memory is therefore
``O(chunk_rows * N)`` in training as well as in inference, and gradients are exact.

Ties: every key whose logit equals the row's k-th largest is kept, so a row with tied logits
at the threshold attends to more than ``k`` keys (e.g. the zero-padded tokens Swin appends
share one key); ``torch.topk`` keeps an arbitrary ``k`` of them. The selection is thus
deterministic and independent of the key order, and equals the authors' wherever the k-th
largest logit is unique.

Under ONNX export the same selection is recorded on the whole logit matrix at once (``TopK``,
comparison, ``Softmax``); without attention dropout the chunk loop traces into one
``torch.compile`` graph, forward and backward (tested with ``fullgraph=True``). Attention
dropout still breaks the graph: its masks are replayed in backward from a seeded
``torch.Generator``, which Dynamo cannot trace.
"""
import math
from contextlib import nullcontext
from numbers import Integral, Real
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

TopkSpec = Union[int, float]

# Number of logit elements (over all leading dims) one query chunk may hold.
# 2**22 float32 values are 16 MiB; a chunk needs a few such buffers at a time.
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def check_topk_spec(topk: TopkSpec, name: str = 'topk') -> TopkSpec:
    """Validate one ``topk`` value: a positive int or a fraction in (0, 1].

    Args:
        topk (int | float): Number of keys per query (int, clamped later to the
            number of keys) or a fraction of the number of keys (float).
        name (str): Name used in error messages. Defaults to 'topk'.

    Returns:
        int | float: ``topk`` unchanged.
    """
    if isinstance(topk, bool) or not isinstance(topk, Real):
        raise TypeError(f'{name} must be an int or a float fraction, '
                        f'got {topk!r} of type {type(topk).__name__}')
    if isinstance(topk, Integral):
        if topk <= 0:
            raise ValueError(f'{name} must be a positive number of keys, got {topk}')
    elif not 0.0 < topk <= 1.0:
        raise ValueError(f'{name} as a float is a fraction of the number of keys and must '
                         f'lie in (0, 1], got {topk}')
    return topk


def resolve_topk(topk: TopkSpec, num_keys: int) -> int:
    """Turn a ``topk`` specification into a number of keys for ``num_keys`` keys.

    An int is clamped to ``num_keys``; a fraction ``f`` gives ``ceil(f * num_keys)`` (at least
    one key, all keys for ``f = 1``).

    Args:
        topk (int | float): Number of keys or fraction of the number of keys.
        num_keys (int): Number of keys each query can see.

    Returns:
        int: Number of keys each query keeps, in ``[1, num_keys]``.
    """
    check_topk_spec(topk)
    if isinstance(topk, Integral):
        return min(int(topk), num_keys)
    # round() removes float noise such as 0.7 * 10 = 7.000000000000001 before ceil.
    return max(1, min(num_keys, math.ceil(round(topk * num_keys, 6))))


def _traced_key_count(fraction: float, num_keys: Union[int, Tensor]) -> Tensor:
    """:func:`resolve_topk` of a fraction in tensor operations, for ONNX export: the exporter
    traces sizes as tensors, and a graph with dynamic axes must compute the count of each
    input's key count, not the example's."""
    keys = torch.as_tensor(num_keys, dtype=torch.float64)
    count = torch.ceil(torch.round(keys * fraction * 1e6) / 1e6)
    return count.clamp(min=1).minimum(keys).to(torch.int64)


def default_chunk_rows(query_shape: Sequence[int], num_keys: int) -> int:
    """Query rows per chunk when none is given: the most whose logits (over all leading
    dims) fit in ``DEFAULT_CHUNK_ELEMENTS``, at least one."""
    per_row = max(1, math.prod(query_shape[:-2]) * num_keys)
    return max(1, DEFAULT_CHUNK_ELEMENTS // per_row)


def _broadcasts_to(shape: Sequence[int], target: Sequence[int]) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` without changing it."""
    if len(shape) > len(target):
        return False
    return all(size in (1, full) for size, full in zip(reversed(shape), reversed(target)))


def _rows(tensor: Optional[Tensor], rows: slice) -> Optional[Tensor]:
    """Slice query rows of a bias/mask that may broadcast along the query dim."""
    if tensor is None or tensor.shape[-2] == 1:
        return tensor
    return tensor[..., rows, :]


def _sum_to_shape(grad: Tensor, shape: Sequence[int]) -> Tensor:
    """Reduce a broadcast gradient back to ``shape`` (inverse of broadcasting)."""
    extra = grad.dim() - len(shape)
    if extra > 0:
        grad = grad.sum(dim=tuple(range(extra)))
    dims = tuple(i for i, size in enumerate(shape) if size == 1 and grad.shape[i] != 1)
    if dims:
        grad = grad.sum(dim=dims, keepdim=True)
    return grad


def _accumulate_dtype(tensor: Tensor) -> torch.dtype:
    """float32 for half-precision inputs, the input's own dtype otherwise."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _masked_logits(scaled_query: Tensor, key: Tensor, attn_bias: Optional[Tensor],
                   attn_mask: Optional[Tensor]) -> Tensor:
    """Logits of a query chunk (at least float32); forbidden keys are ``-inf``.

    Forward and backward call this with identical inputs, so the recomputed logits are
    bitwise equal to the forward ones and the same keys are selected.
    """
    logits = torch.matmul(scaled_query, key.transpose(-2, -1))
    logits = logits.to(_accumulate_dtype(logits))
    if attn_bias is not None:
        logits = logits.add_(attn_bias)
    if attn_mask is not None:
        logits = logits.masked_fill_(~attn_mask, float('-inf'))
    return logits


def _top_probs(logits: Tensor, threshold: Tensor, shift: Tensor) -> Tensor:
    """``exp(logits - shift)`` on the selected keys (``logit >= threshold``), 0 elsewhere.

    Multiplying by a 0/1 float selection written directly by the comparison is cheaper on
    CPU than ``masked_fill`` or a bool multiply (which converts) and avoids ``exp(-inf)``,
    which takes a slow path.
    """
    selected = torch.ge(logits, threshold, out=torch.empty_like(logits))
    return logits.sub_(shift).exp_().mul_(selected)


def _dropout_keep(probs: Tensor, dropout_p: float, generator: torch.Generator) -> Tensor:
    """Scaled keep-mask for attention dropout, drawn from ``generator`` in chunk order."""
    keep = torch.empty_like(probs).bernoulli_(1.0 - dropout_p, generator=generator)
    return keep.div_(1.0 - dropout_p)


def _dropout_generator(dropout_p: float, seed: int,
                       device: torch.device) -> Optional[torch.Generator]:
    """A generator replaying the same dropout masks in forward and backward."""
    if dropout_p == 0:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class _KNNAttentionFunction(torch.autograd.Function):
    """Chunked top-k attention that saves O(N) per row instead of O(N^2) for backward.

    Forward keeps, per query, the selection threshold (k-th largest logit) and the
    log-sum-exp of the selected logits; backward recomputes each chunk's logits, rebuilds
    the probabilities from them and applies the softmax/matmul gradients chunk by chunk.
    """

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, attn_bias: Optional[Tensor],
                attn_mask: Optional[Tensor], topk: int, scale: float, chunk_rows: int,
                dropout_p: float, dropout_seed: int) -> Tensor:
        acc_dtype = _accumulate_dtype(query)
        scaled_query = query * scale
        num_queries = query.shape[-2]
        out = value.new_empty(query.shape[:-1] + value.shape[-1:])
        thresholds = query.new_empty(query.shape[:-1] + (1, ), dtype=acc_dtype)
        log_sum_exp = torch.empty_like(thresholds)
        generator = _dropout_generator(dropout_p, dropout_seed, query.device)
        for start in range(0, num_queries, chunk_rows):
            rows = slice(start, min(start + chunk_rows, num_queries))
            logits = _masked_logits(scaled_query[..., rows, :], key, _rows(attn_bias, rows),
                                    _rows(attn_mask, rows))
            top = torch.topk(logits, topk, dim=-1, sorted=False).values
            threshold = top.amin(dim=-1, keepdim=True)
            row_max = top.amax(dim=-1, keepdim=True)
            del top
            probs = _top_probs(logits, threshold, row_max)
            denom = probs.sum(dim=-1, keepdim=True)
            if generator is not None:
                probs = probs.mul_(_dropout_keep(probs, dropout_p, generator))
            # Normalising the (rows, Dv) output is cheaper than the (rows, N) weights.
            out_rows = torch.matmul(probs.to(value.dtype), value)
            out[..., rows, :] = out_rows.to(acc_dtype).div_(denom)
            thresholds[..., rows, :] = threshold
            log_sum_exp[..., rows, :] = row_max + denom.log()
            # Free this chunk's (rows, N) buffers before the next chunk allocates its own.
            del logits, probs
        ctx.save_for_backward(scaled_query, key, value, attn_bias, attn_mask, out, thresholds,
                              log_sum_exp)
        ctx.scale = scale
        ctx.chunk_rows = chunk_rows
        ctx.dropout_p = dropout_p
        ctx.dropout_seed = dropout_seed
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (scaled_query, key, value, attn_bias, attn_mask, out, thresholds,
         log_sum_exp) = ctx.saved_tensors
        scale, chunk_rows, dropout_p = ctx.scale, ctx.chunk_rows, ctx.dropout_p
        need_q, need_k, need_v, need_bias = ctx.needs_input_grad[:4]
        acc_dtype = _accumulate_dtype(scaled_query)
        key_acc, value_acc = key.to(acc_dtype), value.to(acc_dtype)
        grad_out = grad_out.to(acc_dtype)
        # D_i = sum_j P_ij dP_ij = <dO_i, O_i>, also with dropout applied to P.
        row_dot = (grad_out * out.to(acc_dtype)).sum(dim=-1, keepdim=True)
        grad_q = torch.empty_like(scaled_query, dtype=acc_dtype) if need_q else None
        grad_k = torch.zeros_like(key_acc) if need_k else None
        grad_v = torch.zeros_like(value_acc) if need_v else None
        grad_bias = torch.zeros_like(attn_bias, dtype=acc_dtype) if need_bias else None
        generator = _dropout_generator(dropout_p, ctx.dropout_seed, scaled_query.device)
        num_queries = scaled_query.shape[-2]
        for start in range(0, num_queries, chunk_rows):
            rows = slice(start, min(start + chunk_rows, num_queries))
            query_rows = scaled_query[..., rows, :]
            logits = _masked_logits(query_rows, key, _rows(attn_bias, rows),
                                    _rows(attn_mask, rows))
            probs = _top_probs(logits, thresholds[..., rows, :], log_sum_exp[..., rows, :])
            grad_out_rows = grad_out[..., rows, :]
            grad_probs = torch.matmul(grad_out_rows, value_acc.transpose(-2, -1))
            dropped_probs = probs
            if generator is not None:
                keep = _dropout_keep(probs, dropout_p, generator)
                grad_probs = grad_probs.mul_(keep)
                dropped_probs = probs * keep
            if need_v:
                grad_v += torch.matmul(dropped_probs.transpose(-2, -1), grad_out_rows)
            grad_logits = grad_probs.sub_(row_dot[..., rows, :]).mul_(probs)
            if need_bias:
                if attn_bias.shape[-2] == 1:
                    grad_bias += _sum_to_shape(grad_logits, attn_bias.shape)
                else:
                    grad_bias[..., rows, :] += _sum_to_shape(
                        grad_logits, attn_bias[..., rows, :].shape)
            if need_q:
                grad_q[..., rows, :] = torch.matmul(grad_logits, key_acc).mul_(scale)
            if need_k:
                grad_k += torch.matmul(grad_logits.transpose(-2, -1), query_rows.to(acc_dtype))
            del logits, probs, dropped_probs, grad_probs, grad_logits
        return (None if grad_q is None else grad_q.to(scaled_query.dtype),
                None if grad_k is None else grad_k.to(key.dtype),
                None if grad_v is None else grad_v.to(value.dtype),
                None if grad_bias is None else grad_bias.to(attn_bias.dtype),
                None, None, None, None, None, None)


def _export_knn_attention(query: Tensor, key: Tensor, value: Tensor,
                          attn_bias: Optional[Tensor], attn_mask: Optional[Tensor],
                          topk: Union[int, Tensor],
                          scale: float) -> Tensor:
    """The selection of :class:`_KNNAttentionFunction` on the whole logit matrix at once.

    This is what ONNX export records: the TorchScript exporter drops the chunk loop's slice
    writes into its preallocated output (the exported graph returns garbage), and ``TopK``,
    comparison and ``Softmax`` are plain ONNX operators. The tie rule is the same: every key
    whose logit is at or above the row's k-th largest (``torch.topk``'s k-th value) is kept.
    """
    logits = _masked_logits(query * scale, key, attn_bias, attn_mask)
    threshold = torch.topk(logits, topk, dim=-1).values[..., -1:]
    weights = logits.masked_fill(logits < threshold, float('-inf')).softmax(dim=-1)
    return torch.matmul(weights.to(value.dtype), value)


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast would give a matmul on ``device_type``, or None if it is off."""
    # Devices without autocast (meta, used for shape-only FLOP counting) make the query raise.
    if not (torch.amp.is_autocast_available(device_type)
            and torch.is_autocast_enabled(device_type)):
        return None
    return torch.get_autocast_dtype(device_type)


def knn_attention(query: Tensor,
                  key: Tensor,
                  value: Tensor,
                  topk: TopkSpec,
                  scale: Optional[float] = None,
                  attn_bias: Optional[Tensor] = None,
                  attn_mask: Optional[Tensor] = None,
                  dropout_p: float = 0.0,
                  chunk_size: Optional[int] = None) -> Tensor:
    """k-NN attention: softmax over each query's top-k keys only, then attend.

    Args:
        query (Tensor): Queries of shape ``(..., Nq, D)``.
        key (Tensor): Keys of shape ``(..., Nk, D)`` with the same leading dims as ``query``.
        value (Tensor): Values of shape ``(..., Nk, Dv)``, same leading dims.
        topk (int | float): Keys kept per query: an int (clamped to ``Nk``) or a fraction
            of ``Nk`` in (0, 1] (``ceil(topk * Nk)`` keys).
        scale (float, optional): Logit scale. Defaults to ``D ** -0.5``.
        attn_bias (Tensor, optional): Float bias added to the scaled logits before the
            top-k selection (e.g. relative-position bias), broadcastable to
            ``(..., Nq, Nk)``. Defaults to None.
        attn_mask (Tensor, optional): Bool mask broadcastable to ``(..., Nq, Nk)``; True
            marks keys a query may attend to (the convention of
            ``F.scaled_dot_product_attention``). Forbidden keys are never selected; a query
            with fewer than ``k`` allowed keys attends to its allowed keys only. Every query
            needs at least one allowed key. Defaults to None.
        dropout_p (float): Dropout probability on the attention weights; pass 0 in eval
            mode. Defaults to 0.0.
        chunk_size (int, optional): Query rows per chunk. Defaults to None, which picks the
            largest chunk holding at most ``DEFAULT_CHUNK_ELEMENTS`` logits.

    Returns:
        Tensor: Output of shape ``(..., Nq, Dv)``.
    """
    if query.shape[:-2] != key.shape[:-2] or key.shape[:-1] != value.shape[:-1]:
        raise ValueError('knn_attention expects query (..., Nq, D), key (..., Nk, D) and value '
                         '(..., Nk, Dv) with equal leading dims, got '
                         f'{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}')
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        raise TypeError(f'attn_mask must be a bool tensor (True = may attend), '
                        f'got dtype {attn_mask.dtype}')
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f'dropout_p must lie in [0, 1), got {dropout_p}')
    num_keys = key.shape[-2]
    logits_shape = query.shape[:-1] + (num_keys, )
    for name, tensor in (('attn_bias', attn_bias), ('attn_mask', attn_mask)):
        if tensor is not None and not _broadcasts_to(tensor.shape, logits_shape):
            raise ValueError(f'{name} of shape {tuple(tensor.shape)} does not broadcast to '
                             f'the logits shape {tuple(logits_shape)}')
    if torch.onnx.is_in_onnx_export() and not isinstance(topk, Integral):
        k = _traced_key_count(topk, num_keys)
    else:
        k = resolve_topk(topk, num_keys)
    if scale is None:
        scale = query.shape[-1]**-0.5

    if k >= num_keys:
        # Every allowed key is kept: this is exactly dense masked attention.
        sdpa_mask = attn_bias
        if attn_mask is not None:
            sdpa_mask = attn_mask if attn_bias is None else torch.where(
                attn_mask, attn_bias, float('-inf'))
        if sdpa_mask is not None and sdpa_mask.dtype != torch.bool:
            sdpa_mask = sdpa_mask.to(query.dtype)
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=sdpa_mask, dropout_p=dropout_p, scale=scale)

    if chunk_size is None:
        chunk_size = default_chunk_rows(query.shape, num_keys)
    elif chunk_size <= 0:
        raise ValueError(f'chunk_size must be positive, got {chunk_size}')
    chunk_rows = min(int(chunk_size), query.shape[-2])

    device_type = query.device.type
    cast_dtype = _autocast_dtype(device_type)
    if cast_dtype is not None:
        # Mirror autocast's casts for the matmuls, then run with autocast off so that the
        # backward recomputation sees exactly the forward's dtypes.
        query, key, value = query.to(cast_dtype), key.to(cast_dtype), value.to(cast_dtype)
    if torch.onnx.is_in_onnx_export():
        if dropout_p > 0:
            raise ValueError('knn_attention exports without attention dropout: export the '
                             f'model in eval mode (got dropout_p={dropout_p})')
        return _export_knn_attention(query, key, value, attn_bias, attn_mask, k, float(scale))
    dropout_seed = 0
    if dropout_p > 0:
        dropout_seed = int(torch.randint(0, 2**62, (1, )).item())
    no_autocast = (torch.autocast(device_type, enabled=False)
                   if torch.amp.is_autocast_available(device_type) else nullcontext())
    with no_autocast:
        return _KNNAttentionFunction.apply(query, key, value, attn_bias, attn_mask, k,
                                           float(scale), chunk_rows, float(dropout_p),
                                           dropout_seed)


def topk_per_stage(topk: Union[TopkSpec, Sequence[TopkSpec]],
                   num_stages: int) -> Tuple[TopkSpec, ...]:
    """Expand a ``topk`` specification to one value per stage, validating it.

    Args:
        topk (int | float | Sequence[int | float]): One value for all stages or one per
            stage.
        num_stages (int): Number of stages of the backbone.

    Returns:
        tuple[int | float]: One validated value per stage.
    """
    if isinstance(topk, (list, tuple)):
        if len(topk) != num_stages:
            raise ValueError(f'topk as a per-stage list needs {num_stages} entries (one per '
                             f'stage), got {len(topk)}: {list(topk)}')
        return tuple(check_topk_spec(value, f'topk[{i}]') for i, value in enumerate(topk))
    return (check_topk_spec(topk), ) * num_stages
