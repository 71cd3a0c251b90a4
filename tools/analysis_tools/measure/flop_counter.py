"""Exact FLOP counting of PyTorch models at the ATen dispatch level.

Every ATen call made while a :class:`FlopCounter` is active reaches
``__torch_dispatch__`` after autograd has decomposed composite ops, so ``F.linear``,
``torch.matmul``, ``torch.einsum`` and ``@`` all arrive as ``mm``/``addmm``/``bmm`` calls
with their real shapes, whatever Python wrote them. Counting therefore does not depend on
module types, tracing or the control flow of a forward pass: attention matrix products
(``q @ k^T``, ``attn @ v``), the products of linear and vicinity attention and k-NN
attention's products on gathered keys are counted like any other product. The operations
that never reach the dispatcher as ATen calls are handled explicitly:

* fused attention kernels (``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``'s
  fast path) are counted from their operand shapes;
* mmcv's deformable convolutions are autograd Functions calling a C++ extension; their
  ``forward`` is wrapped while counting. torchvision's ``deform_conv2d`` is a registered op
  and is counted from its shapes.

Convention (that of the papers and of OpenMMLab's tables): one multiply-add is one FLOP;
products are counted (convolutions, deformable convolutions as convolutions over their
sampled inputs, linear layers, matrix products), biases, normalisation, softmax, activations
and other element-wise operations are not. ``convention='fvcore'`` adds fvcore's/mmengine's
estimates for normalisation, up-sampling, adaptive pooling and grid sampling, reproducing
``mmengine.analysis.FlopAnalyzer`` on models it can trace.
"""
import contextlib
import math
from collections import Counter, defaultdict
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

FlopHandler = Callable[[Sequence[Any], Dict[str, Any], Any], int]

CONVENTIONS = ('products', 'fvcore')

aten = torch.ops.aten


def _shape(tensor: torch.Tensor) -> Tuple[int, ...]:
    return tuple(tensor.shape)


def _mm_flops(args: Sequence[Any], kwargs: Dict[str, Any], out: Any) -> int:
    rows, inner = _shape(args[0])
    return rows * inner * _shape(args[1])[-1]


def _addmm_flops(args: Sequence[Any], kwargs: Dict[str, Any], out: Any) -> int:
    return _mm_flops(args[1:], kwargs, out)


def _bmm_flops(args: Sequence[Any], kwargs: Dict[str, Any], out: Any) -> int:
    batch, rows, inner = _shape(args[0])
    return batch * rows * inner * _shape(args[1])[-1]


def _baddbmm_flops(args: Sequence[Any], kwargs: Dict[str, Any], out: Any) -> int:
    return _bmm_flops(args[1:], kwargs, out)


def _mv_flops(args: Sequence[Any], kwargs: Dict[str, Any], out: Any) -> int:
    return math.prod(_shape(args[0]))


def _addmv_flops(args: Sequence[Any], kwargs: Dict[str, Any], out: Any) -> int:
    return math.prod(_shape(args[1]))


def _dot_flops(args: Sequence[Any], kwargs: Dict[str, Any], out: Any) -> int:
    return args[0].numel()


def _conv_flops(args: Sequence[Any], kwargs: Dict[str, Any], out: Any) -> int:
    """MACs of ``aten.convolution``-like ops: (input, weight, bias, stride, padding,
    dilation, transposed, output_padding, groups)."""
    inputs, weight = args[0], args[1]
    transposed = bool(args[6]) if len(args) > 6 else bool(kwargs.get('transposed', False))
    kernel_numel = math.prod(_shape(weight)[2:])
    if transposed:
        # weight is (in, out / groups, *k): every input element feeds out/groups * k outputs
        return inputs.numel() * weight.shape[1] * kernel_numel
    # weight is (out, in / groups, *k): every output element sums in/groups * k products
    return out.numel() * weight.shape[1] * kernel_numel


def _sdpa_flops(args: Sequence[Any], kwargs: Dict[str, Any], out: Any) -> int:
    """Fused attention: q (..., L, E), k (..., S, E), v (..., S, Ev)."""
    query, key, value = args[0], args[1], args[2]
    batch = math.prod(_shape(query)[:-2])
    q_len, qk_dim = _shape(query)[-2:]
    kv_len, v_dim = _shape(value)[-2:]
    assert key.shape[-2] == kv_len
    return batch * q_len * kv_len * (qk_dim + v_dim)


def _native_mha_flops(args: Sequence[Any], kwargs: Dict[str, Any], out: Any) -> int:
    """``aten._native_multi_head_attention`` (nn.MultiheadAttention's inference fast path):
    query (B, L, E), key/value (B, S, E); in-projections, both attention products and the
    output projection."""
    query, key = args[0], args[1]
    batch, q_len, embed_dim = _shape(query)
    kv_len = key.shape[1]
    projections = batch * (2 * q_len + 2 * kv_len) * embed_dim * embed_dim
    attention = 2 * batch * q_len * kv_len * embed_dim
    return projections + attention


def _deform_conv_macs(inputs: torch.Tensor, weight: torch.Tensor, offset: torch.Tensor) -> int:
    """A deformable convolution costs what a convolution with the same output costs: the
    output size is read from the offset map (N, 2 * groups * kh * kw, H_out, W_out)."""
    batch = inputs.shape[0]
    out_h, out_w = _shape(offset)[-2:]
    out_channels, in_per_group = _shape(weight)[:2]
    return batch * out_channels * out_h * out_w * in_per_group * math.prod(_shape(weight)[2:])


def _torchvision_deform_conv_flops(args: Sequence[Any], kwargs: Dict[str, Any],
                                   out: Any) -> int:
    # torchvision::deform_conv2d(input, weight, offset, mask, bias, ...)
    return _deform_conv_macs(args[0], args[1], args[2])


def _norm_flops(affine_arg: int) -> FlopHandler:
    """fvcore: 5 FLOPs per element with an affine transform, 4 without."""

    def handler(args: Sequence[Any], kwargs: Dict[str, Any], out: Any) -> int:
        affine = len(args) > affine_arg and args[affine_arg] is not None
        return args[0].numel() * (5 if affine else 4)

    return handler


def _batch_norm_inference_flops(args: Sequence[Any], kwargs: Dict[str, Any], out: Any) -> int:
    """fvcore's inference batch norm: 1 FLOP per element, 2 with an affine transform."""
    affine = args[1] is not None
    return args[0].numel() * (2 if affine else 1)


def _batch_norm_flops(args: Sequence[Any], kwargs: Dict[str, Any], out: Any) -> int:
    # native_batch_norm(input, weight, bias, running_mean, running_var, training, ...)
    training = bool(args[5]) if len(args) > 5 else bool(kwargs.get('training', False))
    if training:
        return _norm_flops(1)(args, kwargs, out)
    return _batch_norm_inference_flops(args, kwargs, out)


def _output_flops(scale: int) -> FlopHandler:

    def handler(args: Sequence[Any], kwargs: Dict[str, Any], out: Any) -> int:
        first = out[0] if isinstance(out, (tuple, list)) else out
        return first.numel() * scale

    return handler


def _input_flops(args: Sequence[Any], kwargs: Dict[str, Any], out: Any) -> int:
    return args[0].numel()


def _packets(*names: str) -> List[Any]:
    """Op overload packets that exist in this torch build (some are backend specific)."""
    found = []
    for name in names:
        namespace, _, op = name.partition('.')
        packet = getattr(getattr(torch.ops, namespace), op, None)
        if packet is not None:
            found.append(packet)
    return found


def _handlers(packets: List[Any], handler: FlopHandler) -> Dict[Any, FlopHandler]:
    return {packet: handler for packet in packets}


def product_handlers() -> Dict[Any, FlopHandler]:
    """Handlers of the products counted by the default convention."""
    handlers: Dict[Any, FlopHandler] = {
        aten.mm: _mm_flops,
        aten.addmm: _addmm_flops,
        aten.bmm: _bmm_flops,
        aten.baddbmm: _baddbmm_flops,
        aten.mv: _mv_flops,
        aten.addmv: _addmv_flops,
        aten.dot: _dot_flops,
        aten.vdot: _dot_flops,
    }
    handlers.update(
        _handlers(
            _packets('aten.convolution', 'aten._convolution', 'aten.convolution_overrideable',
                     'aten.cudnn_convolution', 'aten.cudnn_convolution_transpose',
                     'aten.mkldnn_convolution', 'aten._slow_conv2d_forward',
                     'aten.slow_conv_dilated2d', 'aten.slow_conv_transpose2d'), _conv_flops))
    handlers.update(
        _handlers(
            _packets('aten._scaled_dot_product_flash_attention_for_cpu',
                     'aten._scaled_dot_product_flash_attention',
                     'aten._scaled_dot_product_efficient_attention',
                     'aten._scaled_dot_product_cudnn_attention',
                     'aten._scaled_dot_product_fused_attention_overrideable'), _sdpa_flops))
    handlers.update(_handlers(_packets('aten._native_multi_head_attention'), _native_mha_flops))
    with contextlib.suppress(ImportError):
        import torchvision.ops  # noqa: F401  (registers torchvision::deform_conv2d)
    handlers.update(_handlers(_packets('torchvision.deform_conv2d'),
                              _torchvision_deform_conv_flops))
    return handlers


def fvcore_extra_handlers() -> Dict[Any, FlopHandler]:
    """fvcore's (and mmengine.analysis') estimates for the non-product ops it counts."""
    handlers: Dict[Any, FlopHandler] = {}
    handlers.update(_handlers(_packets('aten.native_layer_norm'), _norm_flops(2)))
    handlers.update(_handlers(_packets('aten.native_group_norm'), _norm_flops(1)))
    handlers.update(
        _handlers(_packets('aten.native_batch_norm', 'aten._native_batch_norm_legit'),
                  _batch_norm_flops))
    handlers.update(
        _handlers(_packets('aten._native_batch_norm_legit_no_training'),
                  _batch_norm_inference_flops))
    handlers.update(_handlers(_packets('aten.upsample_nearest2d'), _output_flops(1)))
    handlers.update(_handlers(_packets('aten.upsample_bilinear2d'), _output_flops(4)))
    handlers.update(_handlers(_packets('aten.grid_sampler_2d'), _output_flops(4)))
    handlers.update(
        _handlers(_packets('aten._adaptive_avg_pool2d', 'aten.adaptive_avg_pool2d'),
                  _input_flops))
    return handlers


def handlers_for(convention: str) -> Dict[Any, FlopHandler]:
    """The op handlers of a counting convention (see the module docstring)."""
    if convention not in CONVENTIONS:
        raise ValueError(f'convention must be one of {CONVENTIONS}, got {convention!r}')
    handlers = product_handlers()
    if convention == 'fvcore':
        handlers.update(fvcore_extra_handlers())
    return handlers


_ACTIVE_COUNTERS: List['FlopCounter'] = []


class FlopCounter(TorchDispatchMode):
    """Count the FLOPs (multiply-adds) of everything run inside the ``with`` block.

    Counts are kept per op (``by_op``) and, for a model passed as ``model``, per module
    name (``by_module``; a module's count includes its children's). Ops are booked to the
    innermost module running, and a module's total is the sum over its name's subtree, so
    modules whose ``forward`` is called directly (not via ``__call__``, e.g. mmdet's
    ``roi_head.forward``) still get the counts of the sub-modules they call.

    Args:
        model (nn.Module, optional): Model whose module names label ``by_module``.
            Defaults to None.
        convention (str): 'products' or 'fvcore' (see the module docstring).
            Defaults to 'products'.
        extra_handlers (dict, optional): More ``{op packet: handler(args, kwargs, out)}``
            entries, e.g. for a custom op. Defaults to None.
    """

    def __init__(self,
                 model: Optional[nn.Module] = None,
                 convention: str = 'products',
                 extra_handlers: Optional[Dict[Any, FlopHandler]] = None) -> None:
        super().__init__()
        self.handlers = handlers_for(convention)
        if extra_handlers:
            self.handlers.update(extra_handlers)
        self.by_op: Counter = Counter()
        self.by_innermost_module: Dict[str, int] = defaultdict(int)
        self._module_names = ({module: name
                               for name, module in model.named_modules()} if model else {})
        self._module_stack: List[str] = []
        self._suspended = 0
        self._hooks: List[Any] = []

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def add(self, op_name: str, flops: int) -> None:
        """Book ``flops`` under ``op_name`` and under every module now running."""
        if self._suspended or flops == 0:
            return
        self.by_op[op_name] += int(flops)
        self.by_innermost_module[self._module_stack[-1] if self._module_stack else ''] += int(
            flops)

    @property
    def by_module(self) -> Dict[str, int]:
        """FLOPs per module name, children included (``''`` is the whole model)."""
        totals: Dict[str, int] = defaultdict(int)
        for name, flops in self.by_innermost_module.items():
            parts = name.split('.') if name else []
            for depth in range(len(parts) + 1):
                totals['.'.join(parts[:depth])] += flops
        return dict(totals)

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Stop counting, e.g. inside an op already counted as a whole."""
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        handler = self.handlers.get(func._overloadpacket)
        if handler is not None:
            self.add(func._overloadpacket.__name__, handler(args, kwargs, out))
        return out

    def _enter_module(self, module: nn.Module, *unused: Any) -> None:
        name = self._module_names.get(module)
        if name is not None:
            self._module_stack.append(name)

    def _exit_module(self, module: nn.Module, *unused: Any) -> None:
        name = self._module_names.get(module)
        if name is not None and self._module_stack and self._module_stack[-1] == name:
            self._module_stack.pop()

    def __enter__(self):
        _ACTIVE_COUNTERS.append(self)
        if self._module_names:
            self._hooks = [
                nn.modules.module.register_module_forward_pre_hook(self._enter_module),
                nn.modules.module.register_module_forward_hook(self._exit_module,
                                                               always_call=True),
            ]
        return super().__enter__()

    def __exit__(self, *exc_info):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        _ACTIVE_COUNTERS.remove(self)
        return super().__exit__(*exc_info)


def _current_counter() -> Optional[FlopCounter]:
    return _ACTIVE_COUNTERS[-1] if _ACTIVE_COUNTERS else None


def _deform_output_like(inputs: torch.Tensor, weight: torch.Tensor,
                        offset: torch.Tensor) -> torch.Tensor:
    return inputs.new_empty((inputs.shape[0], weight.shape[0], *offset.shape[-2:]))


def _wrap_deform_forward(original: Callable, modulated: bool) -> Callable:
    """Count an mmcv deformable-convolution Function as one op; run it on meta tensors
    as a shape-only op (the C++ extension has no meta kernel)."""

    def forward(ctx, inputs, offset, *args, **kwargs):
        weight_index = 1 if modulated else 0  # modulated: (mask, weight, ...)
        weight = args[weight_index] if len(args) > weight_index else kwargs['weight']
        counter = _current_counter()
        if counter is None:
            return original(ctx, inputs, offset, *args, **kwargs)
        counter.add('mmcv_deform_conv2d', _deform_conv_macs(inputs, weight, offset))
        with counter.suspended():
            if inputs.is_meta:
                return _deform_output_like(inputs, weight, offset)
            return original(ctx, inputs, offset, *args, **kwargs)

    return forward


@contextlib.contextmanager
def mmcv_deform_conv_counting() -> Iterator[None]:
    """Wrap mmcv's deformable-convolution Functions (no-op without mmcv ops).

    ``Function.apply`` looks ``forward`` up on the class at call time, so replacing the
    static method also covers the module-level aliases ``deform_conv2d`` and
    ``modulated_deform_conv2d`` bound at import.
    """
    functions = []
    with contextlib.suppress(ImportError, OSError):
        from mmcv.ops.deform_conv import DeformConv2dFunction
        functions.append((DeformConv2dFunction, False))
    with contextlib.suppress(ImportError, OSError):
        from mmcv.ops.modulated_deform_conv import ModulatedDeformConv2dFunction
        functions.append((ModulatedDeformConv2dFunction, True))
    originals = [(function, function.__dict__['forward']) for function, _ in functions]
    try:
        for function, modulated in functions:
            function.forward = staticmethod(
                _wrap_deform_forward(function.__dict__['forward'].__func__, modulated))
        yield
    finally:
        for function, original in originals:
            function.forward = original


@contextlib.contextmanager
def counting_flops(model: Optional[nn.Module] = None,
                   convention: str = 'products',
                   extra_handlers: Optional[Dict[Any, FlopHandler]] = None
                   ) -> Iterator[FlopCounter]:
    """``with counting_flops(model) as counter: model(x)`` then read ``counter.total``."""
    with mmcv_deform_conv_counting(), FlopCounter(model, convention,
                                                  extra_handlers) as counter:
        yield counter


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
