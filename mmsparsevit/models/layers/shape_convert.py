# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Conversions between token sequences (B, H*W, C) and feature maps (B, C, H, W)."""
from typing import Sequence

from torch import Tensor


def nlc_to_nchw(x: Tensor, hw_shape: Sequence[int]) -> Tensor:
    """Tokens (B, H*W, C) in row-major order -> map (B, C, H, W).

    Args:
        x (Tensor): Tokens of shape (B, H*W, C).
        hw_shape (Sequence[int]): The map's (H, W).

    Returns:
        Tensor: The map, a transposed view of ``x`` (not contiguous).

    Raises:
        ValueError: If the token count is not H*W.
    """
    height, width = hw_shape
    batch, num_tokens, channels = x.shape
    if num_tokens != height * width:
        raise ValueError(f'{num_tokens} tokens do not form a {height}x{width} map')
    return x.transpose(1, 2).reshape(batch, channels, height, width)


def nchw_to_nlc(x: Tensor) -> Tensor:
    """Map (B, C, H, W) -> tokens (B, H*W, C) in row-major order (a transposed view)."""
    return x.flatten(2).transpose(1, 2)
