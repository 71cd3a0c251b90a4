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
        Tensor: The map, a channels-last view of ``x`` when ``x`` is contiguous.

    Raises:
        ValueError: If the token count is not H*W.
    """
    height, width = hw_shape
    batch, num_tokens, channels = x.shape
    if num_tokens != height * width:
        raise ValueError(f'{num_tokens} tokens do not form a {height}x{width} map')
    # Splitting the token axis before permuting keeps the batch stride H*W*C also for
    # B = 1, so that the view reads as channels-last (``is_contiguous(channels_last)``
    # and ``suggest_memory_format``): oneDNN's convolutions then run channels-last
    # instead of copying the input to NCHW first.
    return x.reshape(batch, height, width, channels).permute(0, 3, 1, 2)


def nchw_to_nlc(x: Tensor) -> Tensor:
    """Map (B, C, H, W) -> tokens (B, H*W, C) in row-major order (a transposed view)."""
    return x.flatten(2).transpose(1, 2)
