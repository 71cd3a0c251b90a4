"""Parameters and FLOPs of a model at a given input size, counted at the ATen dispatch level.

Counting is ``torch.utils.flop_counter.FlopCounterMode``: every ATen call of the forward pass
reaches it after autograd has decomposed composite ops, so ``F.linear``, ``torch.matmul``,
``torch.einsum`` and ``@`` all arrive as ``mm``/``addmm``/``bmm`` calls with their real
shapes, whatever Python wrote them. The count therefore does not depend on module types,
tracing or control flow: attention matrix products (``q @ k^T``, ``attn @ v``), the products
of linear and vicinity attention and k-NN attention's products on gathered keys are counted
like any other product. ``FlopCounterMode`` lacks formulas for a few ops these models reach;
they are added through its ``custom_mapping``:

* ``mv``, ``addmv``, ``dot``, ``vdot``;
* CPU fused attention (``F.scaled_dot_product_attention`` dispatches to
  ``_scaled_dot_product_flash_attention_for_cpu``) and ``_native_multi_head_attention``
  (``nn.MultiheadAttention``'s inference fast path), from their operand shapes;
* torchvision's ``deform_conv2d``, counted as a convolution with the same output (the
  bilinear sampling is not counted).

mmcv's deformable convolutions are pybind calls into a C++ extension that no dispatcher mode
sees: they are not counted, and :func:`measure_complexity` warns about models holding one.

Convention (that of the papers and of OpenMMLab's tables): one multiply-add is one FLOP.
``FlopCounterMode`` counts two FLOPs per multiply-add, so the formulas added here are written
in its unit and every count it returns is halved. ``convention='products'`` counts products
only (convolutions, deformable convolutions, linear layers, matrix products; biases,
normalisation, softmax, activations and other element-wise ops are not counted);
``convention='fvcore'`` adds fvcore's/mmengine's estimates for normalisation, up-sampling,
adaptive pooling and grid sampling, reproducing ``mmengine.analysis.FlopAnalyzer`` on models
it can trace.
"""
import contextlib
import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from mmengine.logging import print_log
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .model_builder import forward_fn, synthetic_batch

CONVENTIONS = ('products', 'fvcore')
FLOPS_PER_MAC = 2  # FlopCounterMode's unit

Shape = Sequence[int]
Formula = Callable[..., int]


def _macs(formula: Callable[..., int]) -> Formula:
    """A formula counting multiply-adds (or fvcore FLOPs), in FlopCounterMode's unit."""

    def in_counter_unit(*args: Any, **kwargs: Any) -> int:
        return FLOPS_PER_MAC * formula(*args, **kwargs)

    return in_counter_unit


# FlopCounterMode passes every tensor argument (and the output, as ``out_shape``) as a shape.


@_macs
def _mv(matrix: Shape, vector: Shape, *args: Any, **kwargs: Any) -> int:
    return math.prod(matrix)


@_macs
def _addmv(bias: Shape, matrix: Shape, *args: Any, **kwargs: Any) -> int:
    return math.prod(matrix)


@_macs
def _dot(first: Shape, *args: Any, **kwargs: Any) -> int:
    return math.prod(first)


@_macs
def _sdpa(query: Shape, key: Shape, value: Shape, *args: Any, **kwargs: Any) -> int:
    """Fused attention: q (..., L, E), k (..., S, E), v (..., S, Ev); both products."""
    q_len, qk_dim = query[-2:]
    kv_len, v_dim = value[-2:]
    return math.prod(query[:-2]) * q_len * kv_len * (qk_dim + v_dim)


@_macs
def _native_mha(query: Shape, key: Shape, *args: Any, **kwargs: Any) -> int:
    """nn.MultiheadAttention's fast path, query (B, L, E), key/value (B, S, E): the in- and
    output projections and both attention products."""
    batch, q_len, embed_dim = query
    kv_len = key[1]
    projections = batch * (2 * q_len + 2 * kv_len) * embed_dim * embed_dim
    return projections + 2 * batch * q_len * kv_len * embed_dim


@_macs
def _deform_conv(inputs: Shape, weight: Shape, offset: Shape, *args: Any, **kwargs: Any) -> int:
    """torchvision::deform_conv2d(input, weight, offset, mask, bias, ...): the cost of a
    convolution with the same output, whose size is that of the offset map (N, 2 * groups *
    kh * kw, H_out, W_out)."""
    out_channels, in_per_group, *kernel = weight
    return inputs[0] * out_channels * math.prod(offset[-2:]) * in_per_group * math.prod(kernel)


def _norm(affine_index: int) -> Formula:
    """fvcore: 5 FLOPs per element with an affine transform, 4 without; ``affine_index`` is
    the position of the op's weight argument (the input is 0)."""

    @_macs
    def formula(inputs: Shape, *args: Any, **kwargs: Any) -> int:
        affine = len(args) >= affine_index and args[affine_index - 1] is not None
        return math.prod(inputs) * (5 if affine else 4)

    return formula


def _inference_batch_norm(inputs: Shape, weight: Optional[Shape]) -> int:
    """fvcore's inference batch norm: 1 FLOP per element, 2 with an affine transform."""
    return math.prod(inputs) * (2 if weight is not None else 1)


@_macs
def _batch_norm_no_training(inputs: Shape, weight: Optional[Shape], *args: Any,
                            **kwargs: Any) -> int:
    return _inference_batch_norm(inputs, weight)


def _batch_norm(inputs: Shape, weight: Optional[Shape], *args: Any, **kwargs: Any) -> int:
    # native_batch_norm(input, weight, bias, running_mean, running_var, training, ...)
    training = bool(args[3]) if len(args) > 3 else bool(kwargs.get('training', False))
    if training:
        return _norm(1)(inputs, weight, *args, **kwargs)
    return FLOPS_PER_MAC * _inference_batch_norm(inputs, weight)


def _per_output(scale: int) -> Formula:

    @_macs
    def formula(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        several = isinstance(out_shape[0], (tuple, list))  # a torch.Size is a tuple
        return math.prod(out_shape[0] if several else out_shape) * scale

    return formula


@_macs
def _per_input(inputs: Shape, *args: Any, **kwargs: Any) -> int:
    return math.prod(inputs)


def _packets(*names: str) -> List[Any]:
    """Op overload packets that exist in this torch build (some are backend specific)."""
    found = []
    for name in names:
        namespace, _, op = name.partition('.')
        packet = getattr(getattr(torch.ops, namespace), op, None)
        if packet is not None:
            found.append(packet)
    return found


def custom_mapping(convention: str = 'products') -> Dict[Any, Formula]:
    """The formulas added to ``FlopCounterMode``'s registry for a convention (see the module
    docstring), in its unit (two per multiply-add)."""
    if convention not in CONVENTIONS:
        raise ValueError(f'convention must be one of {CONVENTIONS}, got {convention!r}')
    with contextlib.suppress(ImportError):
        import torchvision.ops  # noqa: F401  (registers torchvision::deform_conv2d)
    groups: List[tuple] = [
        (('aten.mv', ), _mv),
        (('aten.addmv', ), _addmv),
        (('aten.dot', 'aten.vdot'), _dot),
        (('aten._scaled_dot_product_flash_attention_for_cpu',
          'aten._scaled_dot_product_fused_attention_overrideable'), _sdpa),
        (('aten._native_multi_head_attention', ), _native_mha),
        (('torchvision.deform_conv2d', ), _deform_conv),
    ]
    if convention == 'fvcore':
        groups += [
            (('aten.native_layer_norm', ), _norm(2)),
            (('aten.native_group_norm', ), _norm(1)),
            (('aten.native_batch_norm', 'aten._native_batch_norm_legit'), _batch_norm),
            (('aten._native_batch_norm_legit_no_training', ), _batch_norm_no_training),
            (('aten.upsample_nearest2d', ), _per_output(1)),
            (('aten.upsample_bilinear2d', 'aten.grid_sampler_2d'), _per_output(4)),
            (('aten._adaptive_avg_pool2d', 'aten.adaptive_avg_pool2d'), _per_input),
        ]
    mapping = {packet: formula for names, formula in groups for packet in _packets(*names)}
    # FlopCounterMode looks each call's overload up among these packet keys, misses, and runs
    # the overload's Python decomposition where there is one, which eager PyTorch never does:
    # native_batch_norm would be booked under its parts and upsample_nearest2d, decomposed
    # into index ops, not at all. Overloads that eager runs whole (no C++ composite kernel)
    # are keys too, so that they stay whole; their packet's formula counts them.
    for packet, formula in list(mapping.items()):
        for name in packet.overloads():
            overload = getattr(packet, name)
            if not torch._C._dispatch_has_kernel_for_dispatch_key(overload.name(),
                                                                  'CompositeImplicitAutograd'):
                mapping[overload] = formula
    return mapping


class FlopCount:
    """What :func:`counting_flops` counted, in multiply-adds; read it after the block.

    Args:
        mode (FlopCounterMode): The counter.
        model (nn.Module, optional): The model whose module names label ``by_module``.
    """

    def __init__(self, mode: FlopCounterMode, model: Optional[nn.Module]) -> None:
        self._mode = mode
        self._model = model

    @property
    def total(self) -> int:
        return self._mode.get_total_flops() // FLOPS_PER_MAC

    @property
    def by_op(self) -> Dict[str, int]:
        """FLOPs per op name (``'addmm'``, ``'convolution'``, ``'deform_conv2d'``, ...)."""
        counts = self._mode.get_flop_counts().get('Global', {})
        return {
            packet.__name__.split('.')[-1]: flops // FLOPS_PER_MAC
            for packet, flops in counts.items() if flops
        }

    @property
    def by_module(self) -> Dict[str, int]:
        """FLOPs per module name of the model, children included (``''`` is the whole model).

        ``FlopCounterMode`` books an op to every module whose ``forward`` runs through
        ``__call__`` when it runs, under the module's path from the first module called,
        prefixed by that module's class name. A module whose ``forward`` is called directly
        (mmdet's ``roi_head.forward``) is booked nothing; it gets the sum of its children.
        """
        if self._model is None:
            return {}
        root = type(self._model).__name__
        counted = {}
        for name, counts in self._mode.get_flop_counts().items():
            if name == root or name.startswith(root + '.'):
                counted[name[len(root) + 1:]] = sum(counts.values()) // FLOPS_PER_MAC
        totals: Dict[str, int] = {}

        def total(name: str, module: nn.Module) -> int:
            children = sum(
                total(f'{name}.{child}' if name else child, submodule)
                for child, submodule in module.named_children())
            flops = counted.get(name, children)
            if flops:
                totals[name] = flops
            return flops

        total('', self._model)
        return totals


@contextlib.contextmanager
def counting_flops(model: Optional[nn.Module] = None,
                   convention: str = 'products') -> Iterator[FlopCount]:
    """``with counting_flops(model) as count: model(x)``, then read ``count.total``.

    Args:
        model (nn.Module, optional): Model whose module names label ``count.by_module``;
            call it (not its ``forward``) inside the block. Defaults to None.
        convention (str): 'products' or 'fvcore' (see the module docstring).
            Defaults to 'products'.
    """
    mode = FlopCounterMode(display=False, custom_mapping=custom_mapping(convention))
    with mode:
        yield FlopCount(mode, model)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def uncounted_modules(model: nn.Module) -> List[str]:
    """Names of the modules whose products no dispatcher mode sees: mmcv's deformable
    convolutions (pybind calls into its C++ extension)."""
    try:
        from mmcv.ops import DeformConv2d, ModulatedDeformConv2d
    except (ImportError, OSError):  # mmcv without compiled ops: none can be in the model
        return []
    return [
        name for name, module in model.named_modules()
        if isinstance(module, (DeformConv2d, ModulatedDeformConv2d))
    ]


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


def _count(model: nn.Module, shape: Sequence[int], batch_size: int, convention: str,
           device: str) -> Complexity:
    images, data_samples = synthetic_batch(model, shape, batch_size, device=device)
    run = forward_fn(model, images, data_samples)
    with torch.no_grad(), counting_flops(model, convention) as count:
        run()
    return Complexity(
        params=count_parameters(model),
        flops=count.total,
        shape=tuple(shape),
        batch_size=batch_size,
        convention=convention,
        device=device,
        by_op=count.by_op,
        by_module=count.by_module)


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
    uncounted = uncounted_modules(model)
    if uncounted:
        print_log(
            f'{len(uncounted)} mmcv deformable convolution(s) ({", ".join(uncounted[:3])}'
            f'{", ..." if len(uncounted) > 3 else ""}) call a C++ extension no FLOP counter '
            'sees: their products are not counted',
            logger='current',
            level=logging.WARNING)
    if use_meta:
        try:
            return _count(copy.deepcopy(model).to('meta'), shape, batch_size, convention,
                          'meta')
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
