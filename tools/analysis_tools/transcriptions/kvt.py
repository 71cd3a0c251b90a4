"""k-NN attention as the authors' code computes it (damo-cv/KVT), and KVT backbones with it.

The authors select each query's top-k keys with ``torch.topk``, ``scatter_`` the indices
into a dense N x N float mask and replace the unselected logits with ``-inf`` before the
softmax (:func:`mask_scatter_knn_attention`). :func:`plain_knn_backbone` gives a backbone
built by ``type='mmsparsevit.KVT'`` that formulation in every k-NN attention module, with
the modules' own projections, scale, relative-position bias and shifted-window mask, so that
the two compute the same function with different kernels.
"""
import types
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmsparsevit.models.layers.knn_attention import resolve_topk


def mask_scatter_knn_attention(logits: Tensor, value: Tensor, topk: int) -> Tensor:
    """Softmax over each row's ``topk`` largest ``logits``, applied to ``value``.

    Args:
        logits (Tensor): (..., N, M) scaled logits, forbidden pairs already ``-inf``.
        value (Tensor): (..., M, d).
        topk (int): Keys kept per query.

    Returns:
        Tensor: (..., N, d).
    """
    mask = torch.zeros(logits.shape, device=logits.device)
    indices = torch.topk(logits, k=topk, dim=-1, largest=True)[1]
    mask.scatter_(-1, indices, 1.)
    logits = torch.where(mask > 0, logits, torch.full_like(logits, float('-inf')))
    return logits.softmax(dim=-1) @ value


def threshold_knn_attention(logits: Tensor, value: Tensor, topk: int) -> Tensor:
    """Softmax over every key whose logit is at or above each row's ``topk``-th largest
    (the documented tie rule of :func:`~mmsparsevit.models.layers.knn_attention.knn_attention`:
    keys tied at the threshold are all kept, where ``torch.topk`` keeps an arbitrary subset).

    Args, returns: as for :func:`mask_scatter_knn_attention`.
    """
    threshold = torch.topk(logits, k=topk, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float('-inf')).softmax(dim=-1) @ value


def _plain_window_msa_forward(self: nn.Module, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Swin's ``WindowMSA.forward`` with the softmax over each query's top-k keys."""
    batch_windows, tokens, channels = x.shape
    qkv = self.qkv(x).reshape(batch_windows, tokens, 3, self.num_heads,
                              channels // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q * self.scale) @ k.transpose(-2, -1)
    bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(
        tokens, tokens, -1).permute(2, 0, 1)
    logits = logits + bias.unsqueeze(0)
    if mask is not None:
        windows = mask.shape[0]
        logits = logits.view(batch_windows // windows, windows, self.num_heads, tokens, tokens)
        logits = logits.masked_fill(mask.unsqueeze(1).unsqueeze(0) != 0, float('-inf'))
        logits = logits.view(-1, self.num_heads, tokens, tokens)
    out = self.plain_attention(logits, v, resolve_topk(self.knn_topk, tokens))
    out = out.transpose(1, 2).reshape(batch_windows, tokens, channels)
    return self.proj_drop(self.proj(out))


def _plain_multihead_forward(self: nn.MultiheadAttention, query: Tensor, key: Tensor,
                             value: Tensor, **kwargs) -> Tuple[Tensor, None]:
    """``nn.MultiheadAttention.forward`` (packed projections, no masks) with k-NN softmax."""
    if not self.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    batch, queries, channels = query.shape
    head_dims = channels // self.num_heads
    q, k, v = (
        F.linear(t, w, b).reshape(batch, -1, self.num_heads, head_dims).transpose(1, 2)
        for t, w, b in zip((query, key, value), self.in_proj_weight.chunk(3),
                           self.in_proj_bias.chunk(3)))
    logits = (q * head_dims**-0.5) @ k.transpose(-2, -1)
    out = self.plain_attention(logits, v, resolve_topk(self.knn_topk, k.shape[-2]))
    out = self.out_proj(out.transpose(1, 2).reshape(batch, queries, channels))
    return (out if self.batch_first else out.transpose(0, 1)), None


def plain_knn_backbone(model: nn.Module,
                       attention: Callable[[Tensor, Tensor, int], Tensor] = (
                           mask_scatter_knn_attention)) -> nn.Module:
    """Give every k-NN attention module of a KVT backbone a plain formulation.

    Args:
        model (nn.Module): A backbone built by ``type='mmsparsevit.KVT'`` from an
            mmdet/mmseg Swin (``KNNWindowMSA`` modules) or a PVT/PVTv2/MiT
            (``KNNMultiheadAttention`` modules).
        attention (callable): ``(logits, value, topk) -> output``; the authors'
            mask-and-scatter formulation by default, or :func:`threshold_knn_attention`.

    Returns:
        nn.Module: ``model``, changed in place (instance-level ``forward``).
    """
    converted = 0
    for module in model.modules():
        if not hasattr(module, 'knn_topk'):
            continue
        if isinstance(module, nn.MultiheadAttention):
            forward = _plain_multihead_forward
        elif hasattr(module, 'relative_position_index'):
            forward = _plain_window_msa_forward
        else:
            raise TypeError(f'no plain k-NN transcription for {type(module).__name__}')
        module.forward = types.MethodType(forward, module)
        module.plain_attention = attention
        converted += 1
    if converted == 0:
        raise TypeError(f'{type(model).__name__} has no k-NN attention module (build it '
                        'with mmsparsevit.KVT)')
    return model
