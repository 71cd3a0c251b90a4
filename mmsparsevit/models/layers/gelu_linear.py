# Copyright (c) mmsparsevit contributors. All rights reserved.
"""``linear(gelu(x))``, the second half of a transformer FFN, with a leaner backward.

Autograd's composition allocates three tensors of the hidden size in backward: the gradient
of the activation's output, the gradient of its input, and (outside this function) the
gradient of whatever produced ``x``. The first two can live in the activation output's
storage, which backward no longer needs once the weight gradient is formed. On the CPU a
fresh tensor larger than glibc's mmap threshold (32 MiB at most, e.g. the stage-1 hidden
tokens of a 512² input) is page-faulted in anew on every allocation, so each buffer saved
is a pass over the memory saved.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ['gelu_linear']


class _GELULinear(torch.autograd.Function):
    """``F.linear(F.gelu(x), weight, bias)`` whose backward overwrites the saved activation.

    A second backward through the same graph (``retain_graph=True``) would read the
    overwritten activation; autograd's version check refuses it with its usual in-place
    error instead of returning wrong gradients.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                approximate: str) -> Tensor:
        # Contiguous, so that the activation's 2-D view below is a view, not a copy.
        x = x.contiguous()
        activation = F.gelu(x, approximate=approximate)
        ctx.save_for_backward(x, activation, weight)
        ctx.approximate = approximate
        ctx.has_bias = bias is not None
        return F.linear(activation, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> Tuple[Optional[Tensor], ...]:
        x, activation, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        activation_2d = activation.view(-1, activation.shape[-1])
        grad_weight = grad_2d.t().mm(activation_2d) if need_weight else None
        grad_bias = grad_2d.sum(0) if ctx.has_bias and need_bias else None
        grad_x = None
        if need_x:
            grad_activation = torch.mm(grad_2d, weight, out=activation_2d)
            grad_x = torch.ops.aten.gelu_backward.grad_input(
                grad_activation, x.view_as(grad_activation), approximate=ctx.approximate,
                grad_input=grad_activation).view_as(x)
        return grad_x, grad_weight, grad_bias, None


def gelu_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                approximate: str = 'none') -> Tensor:
    """``F.linear(F.gelu(x, approximate=approximate), weight, bias)``.

    Where autograd records the call outside autocast, backward reuses the activation's
    storage for the gradients of the activation's output and input (see the module doc);
    the values are those of the plain composition. Elsewhere (inference, autocast,
    ``torch.compile``, which fuses the plain composition itself) it is the plain
    composition.

    Args:
        x (Tensor): Input of shape (..., in_features).
        weight (Tensor): (out_features, in_features).
        bias (Tensor, optional): (out_features,). Defaults to None.
        approximate (str): GELU's ``'none'`` (erf) or ``'tanh'``. Defaults to 'none'.

    Returns:
        Tensor: Shape (..., out_features).
    """
    device_type = x.device.type
    autocast = (torch.amp.is_autocast_available(device_type)
                and torch.is_autocast_enabled(device_type))
    records_grad = torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in (x, weight, bias))
    if records_grad and not autocast and not torch.compiler.is_compiling():
        return _GELULinear.apply(x, weight, bias, approximate)
    return F.linear(F.gelu(x, approximate=approximate), weight, bias)
