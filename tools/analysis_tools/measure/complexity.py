"""Parameters and FLOPs of a backbone or full model at a given input size."""
import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Sequence

import torch
from mmengine.logging import print_log
from torch import nn

from .flop_counter import count_parameters, counting_flops
from .model_builder import forward_fn, synthetic_batch


@dataclass
class Complexity:
    """What :func:`measure_complexity` found (FLOPs are multiply-adds)."""
    params: int
    flops: int
    shape: Sequence[int]
    batch_size: int
    convention: str
    device: str
    by_op: Dict[str, int] = field(default_factory=dict)
    by_module: Dict[str, int] = field(default_factory=dict)

    def module_breakdown(self, depth: int) -> Dict[str, int]:
        """FLOPs of the modules ``depth`` levels below the root (``depth=1``: children)."""
        return {
            name: flops
            for name, flops in self.by_module.items()
            if name and name.count('.') == depth - 1
        }


@contextlib.contextmanager
def _meta_autocast_as_cpu() -> Iterator[None]:
    """Meta tensors have no autocast state: ``torch.autocast(x.device.type, ...)`` and
    ``torch.is_autocast_enabled(x.device.type)`` raise for 'meta'. During the shape-only
    pass they answer as for the CPU (autocast is off there), so such layers still run."""
    original_autocast = torch.autocast
    original_is_enabled = torch.is_autocast_enabled

    class MetaAsCpuAutocast(original_autocast):

        def __init__(self, device_type: str, *args: Any, **kwargs: Any) -> None:
            super().__init__('cpu' if device_type == 'meta' else device_type, *args, **kwargs)

    def is_autocast_enabled(*args: Any) -> bool:
        return original_is_enabled(*('cpu' if arg == 'meta' else arg for arg in args))

    torch.autocast = MetaAsCpuAutocast
    torch.is_autocast_enabled = is_autocast_enabled
    try:
        yield
    finally:
        torch.autocast = original_autocast
        torch.is_autocast_enabled = original_is_enabled


def _count(model: nn.Module, shape: Sequence[int], batch_size: int, convention: str,
           device: str) -> Complexity:
    images, data_samples = synthetic_batch(model, shape, batch_size, device=device)
    run = forward_fn(model, images, data_samples)
    with torch.no_grad(), counting_flops(model, convention) as counter:
        run()
    return Complexity(
        params=count_parameters(model),
        flops=counter.total,
        shape=tuple(shape),
        batch_size=batch_size,
        convention=convention,
        device=device,
        by_op=dict(counter.by_op),
        by_module=dict(counter.by_module))


def measure_complexity(model: nn.Module,
                       shape: Sequence[int],
                       batch_size: int = 1,
                       convention: str = 'products',
                       use_meta: bool = True) -> Complexity:
    """Count the parameters and FLOPs of one forward pass of ``model``.

    FLOPs depend only on shapes, so the pass first runs on a copy of the model on the
    ``meta`` device (no arithmetic, seconds even at 1536²). Models whose forward needs
    values (non-maximum suppression in an RPN, ``.item()``, data-dependent branches) make
    that pass raise; they are then run for real on the CPU, which gives the same count.

    Args:
        model (nn.Module): A backbone or an mmdet/mmseg model, in eval mode.
        shape (Sequence[int]): Input (height, width).
        batch_size (int): Images per batch. Defaults to 1.
        convention (str): 'products' or 'fvcore'. Defaults to 'products'.
        use_meta (bool): Try the meta-device pass first. Defaults to True.

    Returns:
        Complexity: parameters, FLOPs and their breakdown by op and module.
    """
    if use_meta:
        try:
            meta_model = copy.deepcopy(model).to('meta')
            with _meta_autocast_as_cpu():
                return _count(meta_model, shape, batch_size, convention, 'meta')
        except Exception as error:  # any failure of the shape-only pass: count for real
            print_log(
                f'shape-only (meta) FLOP count failed ({type(error).__name__}: '
                f'{str(error).splitlines()[0] if str(error) else ""}); counting on the CPU',
                logger='current')
    return _count(model, shape, batch_size, convention, 'cpu')


def format_count(value: float, unit: str = 'G') -> str:
    """``4_490_000_000 -> '4.49 G'`` (unit 'G' or 'M')."""
    scale = {'G': 1e9, 'M': 1e6}[unit]
    return f'{value / scale:.2f} {unit}'
