# Copyright (c) mmsparsevit contributors. All rights reserved.
"""The block contract of our backbones: tokens (B, N, C) of an (H, W) map in and out, with
optional activation checkpointing (``with_cp``)."""
from abc import abstractmethod
from typing import Optional, Tuple

import torch.utils.checkpoint as cp
from mmengine.model import BaseModule
from torch import Tensor

__all__ = ['CheckpointedBlock']


class CheckpointedBlock(BaseModule):
    """A block whose :meth:`block_forward` is recomputed in the backward pass when
    ``with_cp`` is set and the input needs gradients (trading compute for activation memory).

    Args:
        with_cp (bool): Checkpoint the block. Defaults to False.
        init_cfg (dict, optional): Initialization config. Defaults to None.
    """

    def __init__(self, with_cp: bool = False, init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.with_cp = with_cp

    @abstractmethod
    def block_forward(self, x: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        """The block on tokens (B, N, C) of an (H, W) = ``hw_shape`` map."""

    def forward(self, x: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(self.block_forward, x, hw_shape, use_reentrant=False)
        return self.block_forward(x, hw_shape)
