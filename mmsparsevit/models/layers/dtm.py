# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Deformable Token Merging (DTM) of LIT.

Reference: "Less is More: Pay Less Attention in Vision Transformers" (AAAI 2022),
https://arxiv.org/abs/2105.14217, official code https://github.com/zhuang-group/LIT.
"""
import math
from contextlib import nullcontext
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_activation_layer, build_norm_layer
from mmengine.model import BaseModule
from torchvision.ops import deform_conv2d


class DeformableTokenMerging(BaseModule):
    """Deformable Token Merging: a learned deformable k x k, stride-k conv.

    A plain conv (``conv_offset``, zero-initialised) predicts one (dy, dx) pair per kernel tap
    and output position; a deformable convolution (``weight``, ``bias``) then samples the input
    bilinearly at the regular grid plus these offsets; BatchNorm and GELU follow. With zero
    offsets the layer is exactly a strided convolution followed by BN and GELU, which is how
    training starts.

    The deformable product is ``torchvision.ops.deform_conv2d``: a dispatcher op with CPU and
    CUDA kernels and a bias, as in the authors' layer, so the official weights load unchanged,
    FLOP counters and ``torch.compile`` see it, and no compiled mmcv is needed. It computes
    what mmcv's ``DeformConv2d`` plus the bias computes (tested against it); on the CPU its
    forward runs within 10 % of mmcv's and its forward + backward faster
    (``tools/analysis_tools/benchmark_deform_conv.py``, figures in docs/model_zoo.md). It
    runs in float32 outside autocast (its CPU kernels have no half/bfloat16 variants; float64
    stays float64); its result is cast back to the input's dtype.

    Offsets follow the usual DCN layout: channel ``2 * (i * k + j)`` is the vertical and
    ``2 * (i * k + j) + 1`` the horizontal displacement of tap (i, j), in input pixels.

    Args:
        in_channels (int): Channels of the input map.
        out_channels (int): Channels of the merged map.
        kernel_size (int): Kernel size, equal to the stride. Defaults to 2.
        norm_cfg (dict): Config of the norm after the conv. Defaults to ``dict(type='BN')``.
        act_cfg (dict): Config of the activation. Defaults to ``dict(type='GELU')``.
        init_cfg (dict, optional): Initialization config. Defaults to None.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size: int = 2,
                 norm_cfg: dict = dict(type='BN'),
                 act_cfg: dict = dict(type='GELU'),
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = kernel_size
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.conv_offset = nn.Conv2d(
            in_channels, 2 * kernel_size * kernel_size, kernel_size=kernel_size,
            stride=kernel_size)
        self.norm = build_norm_layer(norm_cfg, out_channels)[1]
        self.act = build_activation_layer(act_cfg)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as the authors do: nn.Conv2d's default for the deformable weight and bias,
        zero offsets."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.in_channels * self.kernel_size * self.kernel_size)
        nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def init_weights(self) -> None:
        """Keep the zero-offset start unless an ``init_cfg`` says otherwise."""
        if self.init_cfg is None:
            self.reset_parameters()
        else:
            super().init_weights()

    def _pad_to_kernel(self, x: torch.Tensor) -> torch.Tensor:
        # Maps smaller than the kernel (tiny inputs) are zero-padded at the bottom/right so the
        # layer still yields one token, as mmcv's DeformConv2d does (the authors' layer).
        pad_h = max(self.kernel_size - x.shape[2], 0)
        pad_w = max(self.kernel_size - x.shape[3], 0)
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return x

    def deform_conv(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Deformable convolution with bias (no norm/activation).

        Args:
            x (Tensor): Input map of shape (B, C_in, H, W), at least kernel-sized.
            offset (Tensor): Offsets of shape (B, 2 * k * k, H // k, W // k).

        Returns:
            Tensor: (B, C_out, H // k, W // k) in the dtype of ``x``.
        """
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        no_autocast = (torch.autocast(device_type=x.device.type, enabled=False)
                       if torch.amp.is_autocast_available(x.device.type) else nullcontext())
        with no_autocast:
            out = deform_conv2d(x.to(dtype), offset.to(dtype), self.weight.to(dtype),
                                self.bias.to(dtype), stride=self.stride)
        return out.to(x.dtype)

    def forward_with_offsets(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Merge tokens and also return the predicted offsets.

        Args:
            x (Tensor): Input map of shape (B, C_in, H, W).

        Returns:
            tuple[Tensor, Tensor]: Output map (B, C_out, H // k, W // k) (sizes of maps smaller
            than the kernel are taken as k) and offsets (B, 2 * k * k, H // k, W // k).
        """
        x = self._pad_to_kernel(x)
        offset = self.conv_offset(x)
        out = self.act(self.norm(self.deform_conv(x, offset)))
        return out, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Merge each k x k neighbourhood (deformed) of ``x`` (B, C_in, H, W) into one token."""
        return self.forward_with_offsets(x)[0]
