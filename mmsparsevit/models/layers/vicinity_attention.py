# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Vicinity attention: linear attention with a 2-D locality prior.

Reference: Sun et al., "Vicinity Vision Transformer", TPAMI 2023
(https://arxiv.org/abs/2206.10552). Behaviour follows the authors' release
(https://github.com/OpenNLPLab/Vicinity-Vision-Transformer).

For tokens ``i`` and ``j`` of an ``H x W`` map with row/column angles
``a = pi/2 * row / H`` and ``b = pi/2 * col / W``, the attention weight is

- ``'sum'``:     ``relu(q_i) . relu(k_j) * (cos(a_i - a_j) + cos(b_i - b_j))``
- ``'product'``: ``relu(q_i) . relu(k_j) * cos(a_i - a_j) * cos(b_i - b_j)``

normalised over ``j``. Both position terms are an inner product of four
per-token features (``cos(x - y) = cos x cos y + sin x sin y``), so the
attention is evaluated in ``O(N)`` as ``phi(q) (phi(k)^T v)``.
"""
import math
from contextlib import nullcontext
from functools import lru_cache
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import Tensor, nn

POSITION_FORMS = ('sum', 'product')


@lru_cache(maxsize=128)
def vicinity_position_features(height: int, width: int, form: str, device: torch.device,
                               dtype: torch.dtype) -> Tensor:
    """Per-token position features whose inner products are the vicinity terms.

    The result is cached per ``(height, width, form, device, dtype)``: every block
    of a stage (and every forward at that size) reuses one tensor.

    Args:
        height (int): Token map height ``H``.
        width (int): Token map width ``W``.
        form (str): ``'sum'`` or ``'product'``.
        device (torch.device): Device of the result.
        dtype (torch.dtype): Floating dtype of the result.

    Returns:
        Tensor: Shape ``(H * W, 4)``, row-major token order. For ``'sum'`` the
        columns are ``cos a, sin a, cos b, sin b``; for ``'product'`` they are
        ``cos a cos b, cos a sin b, sin a cos b, sin a sin b``.
    """
    if form not in POSITION_FORMS:
        raise ValueError(f'position form must be one of {POSITION_FORMS}, got {form!r}')
    # Built outside inference mode so a cache filled during inference stays usable
    # by autograd later.
    with torch.inference_mode(False), torch.no_grad():
        # Angles are formed in float32 (or float64) like the authors' code, which
        # multiplies the integer index by pi/2 before dividing by the extent.
        angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        rows = torch.arange(height, device=device, dtype=angle_dtype) * (math.pi / 2) / height
        cols = torch.arange(width, device=device, dtype=angle_dtype) * (math.pi / 2) / width
        row_cos_sin = torch.stack([rows.cos(), rows.sin()], dim=-1)  # (H, 2)
        col_cos_sin = torch.stack([cols.cos(), cols.sin()], dim=-1)  # (W, 2)
        if form == 'sum':
            features = torch.cat([
                row_cos_sin[:, None, :].expand(height, width, 2),
                col_cos_sin[None, :, :].expand(height, width, 2)
            ], dim=-1)
        else:
            features = row_cos_sin[:, None, :, None] * col_cos_sin[None, :, None, :]
        return features.reshape(height * width, 4).to(dtype).contiguous()


class _ClampMagnitude(torch.autograd.Function):
    """Autograd for the magnitude clamp that saves a boolean mask instead of the input."""

    @staticmethod
    def forward(ctx, x: Tensor, min_magnitude: float, max_magnitude: float) -> Tensor:
        magnitude = x.abs()
        ctx.save_for_backward((magnitude >= min_magnitude) & (magnitude <= max_magnitude))
        return magnitude.clamp_(min_magnitude, max_magnitude).mul_(x.sign())

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Optional[Tensor], None, None]:
        in_range, = ctx.saved_tensors
        return grad * in_range, None, None


def clamp_magnitude(x: Tensor, min_magnitude: float, max_magnitude: float) -> Tensor:
    """``sign(x) * clamp(|x|, min_magnitude, max_magnitude)``; exact zeros stay zero.

    The gradient is the one of the formula: 1 where ``min <= |x| <= max`` (``x != 0``),
    0 elsewhere. Outside autograd the result is written into ``x``'s storage, so pass
    only tensors the caller owns.

    Args:
        x (Tensor): Input tensor.
        min_magnitude (float): Smallest magnitude of a non-zero element.
        max_magnitude (float): Largest magnitude of any element.

    Returns:
        Tensor: The clamped tensor.
    """
    if x.requires_grad and torch.is_grad_enabled():
        return _ClampMagnitude.apply(x, min_magnitude, max_magnitude)
    sign = x.sign()
    return x.abs_().clamp_(min_magnitude, max_magnitude).mul_(sign)


class VicinityAttention(BaseModule):
    """Vicinity attention with feature reduction and a feature-preserving path.

    ``q, k, v`` are projected from ``embed_dims`` to ``embed_dims / feature_reduction``
    (Feature Reduction Attention), attended with the vicinity-weighted linear
    attention and projected back. A squeeze-and-excitation gate computed from the
    block input rescales the result as ``y * (1 + gate)`` (Feature Preserving
    Connection).

    The authors bound intermediate magnitudes to ``[1e-4, 1e4]`` (sign kept, zeros
    kept) after ``phi(k)^T v``, after the numerator, after the normaliser, after
    their product, after the output projection and after the gate; released
    weights were trained with it, so it is on by default. The attention product
    and its normaliser are always computed in at least float32, which keeps them
    finite under ``torch.autocast`` with float16/bfloat16.

    Args:
        embed_dims (int): Channels of the input and output tokens.
        num_heads (int): Number of attention heads.
        feature_reduction (int): Factor by which ``q, k, v`` are narrowed.
            Defaults to 2.
        se_ratio (int): Channel reduction inside the feature-preserving gate.
            Defaults to 1.
        position_form (str): ``'sum'`` (``cos(da) + cos(db)``) or ``'product'``
            (``cos(da) * cos(db)``). Defaults to 'sum'.
        clamp_range (tuple[float, float], optional): Magnitude bounds
            ``(min, max)``; ``None`` disables the clamping. Defaults to
            (1e-4, 1e4).
        eps (float): Added to the normaliser before inverting it.
            Defaults to 1e-4.
        init_cfg (dict, optional): Initialization config. Defaults to None.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 feature_reduction: int = 2,
                 se_ratio: int = 1,
                 position_form: str = 'sum',
                 clamp_range: Optional[Tuple[float, float]] = (1e-4, 1e4),
                 eps: float = 1e-4,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if embed_dims % num_heads != 0:
            raise ValueError(
                f'embed_dims ({embed_dims}) must be divisible by num_heads ({num_heads})')
        if (embed_dims // num_heads) % feature_reduction != 0:
            raise ValueError(f'the head width embed_dims/num_heads = {embed_dims // num_heads} '
                             f'must be divisible by feature_reduction ({feature_reduction})')
        if not 1 <= se_ratio <= embed_dims:
            raise ValueError(f'se_ratio must be in [1, embed_dims={embed_dims}], got {se_ratio}')
        if position_form not in POSITION_FORMS:
            raise ValueError(
                f'position_form must be one of {POSITION_FORMS}, got {position_form!r}')
        if clamp_range is not None and not 0 < clamp_range[0] <= clamp_range[1]:
            raise ValueError(f'clamp_range must be (min, max) with 0 < min <= max, '
                             f'got {clamp_range}')
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.feature_reduction = feature_reduction
        self.position_form = position_form
        self.clamp_range = None if clamp_range is None else tuple(clamp_range)
        self.eps = eps
        reduced_dims = embed_dims // feature_reduction
        self.head_dims = reduced_dims // num_heads

        self.q_proj = nn.Linear(embed_dims, reduced_dims)
        self.k_proj = nn.Linear(embed_dims, reduced_dims)
        self.v_proj = nn.Linear(embed_dims, reduced_dims)
        self.out_proj = nn.Linear(reduced_dims, embed_dims)
        self.se_reduce = nn.Linear(embed_dims, embed_dims // se_ratio, bias=False)
        self.se_expand = nn.Linear(embed_dims // se_ratio, embed_dims, bias=False)

    def _clamp(self, x: Tensor) -> Tensor:
        if self.clamp_range is None:
            return x
        return clamp_magnitude(x, *self.clamp_range)

    def vicinity_attention(self, query: Tensor, key: Tensor, value: Tensor,
                           hw_shape: Tuple[int, int]) -> Tensor:
        """Linear-time vicinity attention of already projected tokens.

        Args:
            query (Tensor): Shape (B, N, num_heads * head_dims), before ReLU.
            key (Tensor): Same shape as ``query``, before ReLU.
            value (Tensor): Same shape as ``query``.
            hw_shape (tuple[int, int]): ``(H, W)`` with ``H * W == N``.

        Returns:
            Tensor: Shape (B, N, num_heads * head_dims), dtype of ``query``.
        """
        batch, num_tokens, _ = query.shape
        height, width = hw_shape
        heads, head_dims = self.num_heads, self.head_dims
        out_dtype = query.dtype
        compute_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32

        device_type = query.device.type
        autocast_disabled = torch.autocast(device_type, enabled=False) if (
            torch.amp.is_autocast_available(device_type)
            and torch.is_autocast_enabled(device_type)) else nullcontext()
        with autocast_disabled:

            def split_heads(x: Tensor) -> Tensor:
                x = x.to(compute_dtype).view(batch, num_tokens, heads, head_dims)
                return x.transpose(1, 2)

            query = F.relu(split_heads(query))
            key = F.relu(split_heads(key))
            value = split_heads(value)
            # (N, 4, 1): broadcast over heads and channels so that the expanded
            # features are laid out as [position term, channel], the authors' order.
            position = vicinity_position_features(height, width, self.position_form,
                                                  query.device, compute_dtype)[:, :, None]
            query = (query.unsqueeze(-2) * position).flatten(-2)  # (B, h, N, 4d)
            key = (key.unsqueeze(-2) * position).flatten(-2)

            key_value = self._clamp(key.transpose(-2, -1) @ value)  # (B, h, 4d, d)
            key_sum = key.sum(dim=-2, keepdim=True)  # (B, h, 1, 4d)
            normaliser = self._clamp(1.0 / ((query * key_sum).sum(-1, keepdim=True) + self.eps))
            numerator = self._clamp(query @ key_value)
            out = self._clamp(numerator * normaliser)
            out = out.transpose(1, 2).reshape(batch, num_tokens, heads * head_dims)
        return out.to(out_dtype)

    def forward(self, x: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        """Attend over the tokens of one ``H x W`` map.

        Args:
            x (Tensor): Tokens of shape (B, N, embed_dims), ``N = H * W``, row-major.
            hw_shape (tuple[int, int]): ``(H, W)``.

        Returns:
            Tensor: Shape (B, N, embed_dims).
        """
        batch, num_tokens, channels = x.shape
        height, width = hw_shape
        if height * width != num_tokens or channels != self.embed_dims:
            raise ValueError(f'expected tokens of shape (B, {height}*{width}, {self.embed_dims}) '
                             f'for hw_shape={tuple(hw_shape)}, got {tuple(x.shape)}')
        gate = self.se_expand(F.relu(self.se_reduce(x.mean(dim=1)))).sigmoid().unsqueeze(1)
        out = self.vicinity_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), hw_shape)
        out = self._clamp(self.out_proj(out))
        return self._clamp(torch.addcmul(out, out, gate))
