"""Export to ONNX: backbones, RetinaNet-style detectors and whole-image segmentors.

The detector and segmentor are wrapped in modules whose forward is the whole inference of
mmdet's / mmseg's ``predict`` written in operations the ONNX exporter can express (score
threshold, per-level top-k, box decoding, NMS; resizing and argmax), so the exported graph
returns post-processed predictions. Every export is checked: :func:`export_onnx` runs the
graph in onnxruntime and refuses it (:class:`ExportError`, no file left) unless its outputs
equal PyTorch's within :data:`RELATIVE_TOLERANCE`, so a graph that computes something else is
never written.

The TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) is used: it records what
the model computes on one example (tracing), which is what the post-processing with its
data-dependent number of boxes needs (NonZero, TopK and NonMaxSuppression take sizes from
data at run time). Python-side values, e.g. a size-dependent position table built from
``int`` sizes, become constants of the graph; :func:`export_onnx` therefore checks a dynamic
graph at a second input size too and refuses it when the graph is specialised to the first.
"""
import inspect
import io
import math
import os
import warnings
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'DetectorExport', 'ExportError', 'RELATIVE_TOLERANCE', 'SegmentorExport', 'compare',
    'export_onnx', 'predict_outputs', 'relative_error', 'run_onnx'
]

# The acceptance bound (max |difference| / max |reference|). float32 graphs that
# only reorder sums land near 1e-6; a wrong graph lands far above.
RELATIVE_TOLERANCE = 1e-4
DEFORM_CONV_OPSET = 19  # the first ONNX opset with DeformConv
DEFAULT_OPSET = 19


class ExportError(RuntimeError):
    """A model (or part) that cannot be exported to a graph computing what it computes."""


def _deform_conv2d_symbolic(g, input, weight, offset, mask, bias, stride_h, stride_w, pad_h,
                            pad_w, dil_h, dil_w, n_weight_grps, n_offset_grps, use_mask):
    """``torchvision::deform_conv2d`` as ONNX ``DeformConv`` (opset 19); the offset layout
    ((dy, dx) per kernel tap) is the same in both (checked by the tests against PyTorch)."""
    from torch.onnx import symbolic_helper
    kernel_shape = symbolic_helper._get_tensor_sizes(weight)[2:]
    inputs = [input, weight, offset, bias]
    if symbolic_helper._parse_arg(use_mask, 'b'):
        inputs.append(mask)
    ints = {
        name: symbolic_helper._parse_arg(value, 'i')
        for name, value in dict(stride_h=stride_h, stride_w=stride_w, pad_h=pad_h,
                                pad_w=pad_w, dil_h=dil_h, dil_w=dil_w, groups=n_weight_grps,
                                offset_groups=n_offset_grps).items()
    }
    return g.op(
        'DeformConv',
        *inputs,
        dilations_i=[ints['dil_h'], ints['dil_w']],
        group_i=ints['groups'],
        offset_group_i=ints['offset_groups'],
        kernel_shape_i=kernel_shape,
        pads_i=[ints['pad_h'], ints['pad_w'], ints['pad_h'], ints['pad_w']],
        strides_i=[ints['stride_h'], ints['stride_w']])


def _deform_conv2d_needs_opset_19(g, *args):
    raise ExportError('torchvision::deform_conv2d (the deformable token merging of LIT) '
                      f'exports as ONNX DeformConv, which needs --opset {DEFORM_CONV_OPSET} or '
                      'later')


def _register_symbolics() -> None:
    """Teach the exporter ``torchvision::deform_conv2d``; torchvision registers only nms and
    the RoI ops itself."""
    import torchvision  # noqa: F401  (registers torchvision's own symbolics, nms among them)
    torch.onnx.register_custom_op_symbolic('torchvision::deform_conv2d',
                                           _deform_conv2d_needs_opset_19, 9)
    torch.onnx.register_custom_op_symbolic('torchvision::deform_conv2d',
                                           _deform_conv2d_symbolic, DEFORM_CONV_OPSET)


class _Preprocess(nn.Module):
    """The data preprocessor's test-time steps: channel swap, normalisation, padding."""

    def __init__(self, swap_channels: bool, mean: Optional[torch.Tensor],
                 std: Optional[torch.Tensor], size_divisor: int, pad_value: float) -> None:
        super().__init__()
        self.swap_channels = swap_channels
        self.register_buffer('mean', None if mean is None else mean.detach().clone().view(
            1, -1, 1, 1))
        self.register_buffer('std', None if std is None else std.detach().clone().view(
            1, -1, 1, 1))
        self.size_divisor = size_divisor
        self.pad_value = pad_value

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.swap_channels:
            image = image[:, [2, 1, 0]]
        if self.mean is not None:
            image = (image - self.mean) / self.std
        if self.size_divisor > 1:
            height, width = image.shape[-2:]
            pad_h = -height % self.size_divisor
            pad_w = -width % self.size_divisor
            image = F.pad(image, (0, pad_w, 0, pad_h), value=self.pad_value)
        return image


def _normalisation(preprocessor: nn.Module) -> Tuple[Optional[torch.Tensor], ...]:
    if getattr(preprocessor, '_enable_normalize', True):
        return preprocessor.mean, preprocessor.std
    return None, None


class DetectorExport(nn.Module):
    """A RetinaNet-style detector's whole inference for one image, as ONNX can express it.

    Input: one image ``(1, 3, H, W)`` as the test pipeline hands it to the model (float,
    channel order and value range of the loaded image, already resized). Outputs: ``boxes``
    ``(n, 4)`` (x1, y1, x2, y2 in input pixels), ``scores`` ``(n, )``, ``labels`` ``(n, )``,
    what ``model.predict`` returns for an image whose ``img_shape`` and ``ori_shape`` are
    ``(H, W)`` (scale factor 1; map the boxes back to the original image as the pipeline's
    resize requires).

    The ``test_cfg`` semantics are mmdet's ``BaseDenseHead._predict_by_feat_single`` and
    ``_bbox_post_process``: per level, the ``nms_pre`` highest (prior, class) scores above
    ``score_thr`` (here: the ``nms_pre`` highest, then the threshold; the same set), boxes
    decoded and clipped to ``(H, W)``, boxes not wider and taller than ``min_bbox_size``
    dropped, class-wise NMS (mmcv's and torchvision's ``batched_nms`` both offset each class
    by the largest coordinate + 1), the ``max_per_img`` best kept.

    Args:
        detector (nn.Module): An mmdet ``SingleStageDetector`` whose head is an
            ``AnchorHead`` with sigmoid classification (RetinaNet).
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        from mmdet.models.dense_heads import AnchorHead
        from mmdet.models.detectors import SingleStageDetector
        head = getattr(detector, 'bbox_head', None)
        if not (isinstance(detector, SingleStageDetector) and isinstance(head, AnchorHead)
                and head.use_sigmoid_cls and type(head).predict_by_feat is
                AnchorHead.predict_by_feat):
            raise ExportError(
                f'{type(detector).__name__} with {type(head).__name__}: only single-stage '
                'detectors with an anchor head, sigmoid scores and the dense-head '
                'post-processing (RetinaNet) have an export wrapper; two-stage detectors '
                'need RoI post-processing that is not written for export here')
        from mmdet.models.task_modules.coders import DeltaXYWHBBoxCoder
        if type(head.bbox_coder) is not DeltaXYWHBBoxCoder or head.bbox_coder.use_box_type:
            raise ExportError(f'{type(head.bbox_coder).__name__}: only DeltaXYWHBBoxCoder '
                              'with plain box tensors has an export path')
        cfg = head.test_cfg
        nms = dict(cfg.nms)
        if nms.pop('type', 'nms') != 'nms' or set(nms) - {'iou_threshold'}:
            raise ExportError(f'test_cfg.nms={cfg.nms}: only plain NMS with an '
                              'iou_threshold exports (ONNX NonMaxSuppression)')
        self.detector = detector
        preprocessor = detector.data_preprocessor
        self.preprocess = _Preprocess(preprocessor._channel_conversion,
                                      *_normalisation(preprocessor),
                                      preprocessor.pad_size_divisor, preprocessor.pad_value)
        self.nms_pre = cfg.get('nms_pre', -1)
        self.score_thr = cfg.get('score_thr', 0.0)
        self.min_bbox_size = cfg.get('min_bbox_size', -1)
        self.iou_threshold = nms['iou_threshold']
        self.max_per_img = cfg.max_per_img

    def _level_candidates(self, cls_score: torch.Tensor, bbox_pred: torch.Tensor,
                          priors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        head = self.detector.bbox_head
        num_classes = head.cls_out_channels
        scores = cls_score[0].permute(1, 2, 0).reshape(-1).sigmoid()
        deltas = bbox_pred[0].permute(1, 2, 0).reshape(-1, head.bbox_coder.encode_size)
        if 0 < self.nms_pre < scores.shape[0]:
            scores, index = scores.topk(self.nms_pre)
        else:
            scores, index = scores.sort(descending=True)
        keep = scores > self.score_thr
        scores, index = scores[keep], index[keep]
        if self.nms_pre <= 0:
            # mmdet slices [:min(nms_pre, n)], which drops the last -nms_pre candidates.
            scores, index = scores[:self.nms_pre], index[:self.nms_pre]
        prior_index = torch.div(index, num_classes, rounding_mode='floor')
        return scores, index % num_classes, priors[prior_index], deltas[prior_index]

    def _decode(self, priors: torch.Tensor, deltas: torch.Tensor,
                img_shape: Tuple[int, int]) -> torch.Tensor:
        """``DeltaXYWHBBoxCoder.decode`` written out: mmdet's ``delta2bbox`` returns early when
        there are no boxes, which tracing would record as the example's branch (an example
        without candidates gave a graph returning raw deltas), and its ONNX branch imports
        ``mmdet.core``, which mmdet 3.x no longer has."""
        coder = self.detector.bbox_head.bbox_coder
        # The head calls decode without it, so decode's default applies.
        wh_ratio_clip = inspect.signature(coder.decode).parameters['wh_ratio_clip'].default
        max_ratio = abs(math.log(wh_ratio_clip))
        deltas = deltas * deltas.new_tensor(coder.stds) + deltas.new_tensor(coder.means)
        sizes = priors[:, 2:] - priors[:, :2]
        shifts = sizes * deltas[:, :2]
        if coder.add_ctr_clamp:
            shifts = shifts.clamp(min=-coder.ctr_clamp, max=coder.ctr_clamp)
            log_scales = deltas[:, 2:].clamp(max=max_ratio)
        else:
            log_scales = deltas[:, 2:].clamp(min=-max_ratio, max=max_ratio)
        centres = (priors[:, :2] + priors[:, 2:]) * 0.5 + shifts
        sizes = sizes * log_scales.exp()
        boxes = torch.cat([centres - sizes * 0.5, centres + sizes * 0.5], dim=-1)
        if not coder.clip_border:
            return boxes
        height, width = img_shape
        limit = boxes.new_tensor([width, height, width, height])
        boxes = torch.where(boxes < 0, boxes.new_tensor(0.), boxes)
        return torch.where(boxes > limit, limit, boxes)

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        head = self.detector.bbox_head
        img_shape = tuple(image.shape[-2:])
        cls_scores, bbox_preds = head(self.detector.extract_feat(self.preprocess(image)))
        mlvl_priors = head.prior_generator.grid_priors(
            [score.shape[-2:] for score in cls_scores], dtype=image.dtype, device=image.device)
        levels = [self._level_candidates(*level)
                  for level in zip(cls_scores, bbox_preds, mlvl_priors)]
        scores, labels, priors, deltas = (torch.cat(parts) for parts in zip(*levels))
        boxes = self._decode(priors, deltas, img_shape)
        if self.min_bbox_size >= 0:
            valid = ((boxes[:, 2] - boxes[:, 0] > self.min_bbox_size)
                     & (boxes[:, 3] - boxes[:, 1] > self.min_bbox_size))
            boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
        keep = _class_wise_nms(boxes, scores, labels, self.iou_threshold)[:self.max_per_img]
        return boxes[keep], scores[keep], labels[keep]


def _class_wise_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                    iou_threshold: float) -> torch.Tensor:
    """Indices kept by NMS within each class, best first: the kept set of mmcv's and
    torchvision's ``batched_nms``, without their branches on the number of boxes.

    Both return early for no boxes (and mmcv loops over classes above 10000), which tracing
    records as the example's branch: an example without candidate boxes gave a graph that
    returns none for every image. Here one path serves any count: each class's boxes are
    shifted by the label times (largest coordinate + 1), which keeps the classes apart for
    boxes clipped to the image (mmcv assumes non-negative coordinates as well), then one NMS.
    """
    from torchvision.ops import nms
    largest = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
    return nms(boxes + (labels.to(boxes) * (largest + 1))[:, None], scores, iou_threshold)


class SegmentorExport(nn.Module):
    """A whole-image mmseg ``EncoderDecoder``'s inference for one image.

    Input: one image ``(1, 3, H, W)`` as the test pipeline hands it to the model. Outputs:
    ``seg_logits`` ``(1, C, H, W)`` (the decode head's logits resized bilinearly to the
    input) and ``seg_map`` ``(1, H, W)`` (their argmax), what ``model.predict`` returns as
    ``seg_logits`` and ``pred_sem_seg`` for an image whose ``img_shape`` and ``ori_shape``
    are ``(H, W)`` (a second resize to the same size is the identity).

    Args:
        segmentor (nn.Module): An mmseg ``EncoderDecoder`` with ``test_cfg.mode='whole'``
            and a multi-class decode head (argmax; no auxiliary-only or binary output).
    """

    def __init__(self, segmentor: nn.Module) -> None:
        super().__init__()
        from mmseg.models.segmentors import EncoderDecoder
        if type(segmentor) is not EncoderDecoder:
            raise ExportError(f'{type(segmentor).__name__}: only mmseg EncoderDecoder has an '
                              'export wrapper')
        mode = segmentor.test_cfg.get('mode', 'whole')
        if mode != 'whole':
            raise ExportError(f"test_cfg.mode={mode!r}: only 'whole' inference exports (slide "
                              'inference merges a data-dependent number of crops)')
        if segmentor.out_channels == 1:
            raise ExportError('a binary (out_channels=1) decode head thresholds a sigmoid; '
                              'only the argmax of a multi-class head has an export wrapper')
        preprocessor = segmentor.data_preprocessor
        if preprocessor.test_cfg:
            raise ExportError(f'data_preprocessor.test_cfg={preprocessor.test_cfg}: test-time '
                              'padding is not reproduced by the export wrapper')
        self.segmentor = segmentor
        self.preprocess = _Preprocess(preprocessor.channel_conversion,
                                      *_normalisation(preprocessor), 1, 0.)

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        from mmseg.models.utils import resize
        segmentor = self.segmentor
        logits = segmentor.decode_head(segmentor.extract_feat(self.preprocess(image)))
        logits = resize(logits, size=image.shape[-2:], mode='bilinear',
                        align_corners=segmentor.align_corners)
        return logits, logits.argmax(dim=1)


def relative_error(reference: np.ndarray, result: np.ndarray) -> float:
    """``max |result - reference| / max |reference|`` (0 for two empty or zero arrays, inf
    for a shape mismatch)."""
    reference, result = np.asarray(reference, np.float64), np.asarray(result, np.float64)
    if reference.shape != result.shape:
        return float('inf')
    if reference.size == 0:
        return 0.0
    scale = np.abs(reference).max()
    difference = np.abs(result - reference).max()
    return float(difference / scale) if scale > 0 else float(difference > 0) * float('inf')


def run_onnx(model_bytes_or_path, *inputs: torch.Tensor) -> List[np.ndarray]:
    """Run an ONNX model in onnxruntime on the CPU."""
    import onnxruntime
    session = onnxruntime.InferenceSession(model_bytes_or_path,
                                           providers=['CPUExecutionProvider'])
    feeds = {arg.name: tensor.numpy() for arg, tensor in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    # The TorchScript exporter warns about every traced Python value (sizes, asserts); the
    # check against onnxruntime is what tells whether the graph is right.
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        yield


def _outputs(module: nn.Module, image: torch.Tensor) -> List[torch.Tensor]:
    with torch.no_grad():
        outputs = module(image)
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


def predict_outputs(model: nn.Module, image: torch.Tensor) -> List[torch.Tensor]:
    """What mmdet's / mmseg's ``model.predict`` returns for ``image`` ``(1, 3, H, W)`` (after
    the model's data preprocessor; ``img_shape`` = ``ori_shape`` = ``(H, W)``), in the order
    of the :class:`DetectorExport` / :class:`SegmentorExport` outputs."""
    height, width = image.shape[-2:]
    meta = dict(img_shape=(height, width), ori_shape=(height, width))
    if isinstance(model, DetectorExport):
        from mmdet.structures import DetDataSample
        model, sample = model.detector, DetDataSample(metainfo=dict(meta, scale_factor=(1., 1.)))
    elif isinstance(model, SegmentorExport):
        from mmseg.structures import SegDataSample
        model, sample = model.segmentor, SegDataSample(metainfo=meta)
    else:
        raise TypeError(f'predict_outputs needs a DetectorExport or SegmentorExport, got '
                        f'{type(model).__name__}')
    with torch.no_grad():
        data = model.data_preprocessor(dict(inputs=[image[0]], data_samples=[sample]), False)
        result = model.predict(data['inputs'], data['data_samples'])[0]
    if 'pred_instances' in result:
        found = result.pred_instances
        return [found.bboxes, found.scores, found.labels]
    return [result.seg_logits.data[None], result.pred_sem_seg.data]


def compare(expected: Sequence[torch.Tensor], results: Sequence[np.ndarray],
            names: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Relative error of each of ``results`` against ``expected``, keyed by ``names``
    (default ``output <i>``); integer outputs (labels, segmentation maps) must be equal (0,
    else inf)."""
    names = names or [f'output {index}' for index in range(len(expected))]
    errors = {}
    for name, reference, result in zip(names, expected, results):
        reference = reference.numpy()
        if reference.dtype.kind in 'iub':
            equal = reference.shape == result.shape and np.array_equal(reference, result)
            errors[name] = 0.0 if equal else float('inf')
        else:
            errors[name] = relative_error(reference, result)
    if len(results) != len(expected):
        errors['number of outputs'] = float('inf')
    return errors


def export_onnx(module: nn.Module,
                shape: Sequence[int],
                output: Optional[str] = None,
                opset: int = DEFAULT_OPSET,
                dynamic: bool = False,
                check_shape: Optional[Sequence[int]] = None,
                output_names: Optional[Sequence[str]] = None,
                seed: int = 0) -> Tuple[bytes, Dict[str, Dict[str, float]]]:
    """Export ``module`` (eval mode, one ``(1, 3, H, W)`` input) and check the graph.

    The graph is run in onnxruntime on a random image of ``shape`` (uniform in [0, 255], the
    value range of loaded images) and, for a ``dynamic`` export, on one of ``check_shape``
    too (default: ``shape`` plus 32 in both sides); every output must match PyTorch's within
    :data:`RELATIVE_TOLERANCE` (integer outputs exactly).

    Args:
        module (nn.Module): A backbone, :class:`DetectorExport` or :class:`SegmentorExport`.
        shape (Sequence[int]): ``(H, W)`` of the example input.
        output (str, optional): Where to write the graph; nothing is written when the
            check fails. Defaults to None (not written).
        opset (int): ONNX opset. Defaults to 19 (LIT's DeformConv needs it).
        dynamic (bool): Make H and W dynamic axes. Defaults to False.
        check_shape (Sequence[int], optional): Second size checked for a dynamic export.
        output_names (Sequence[str], optional): Names of the graph outputs.
        seed (int): Seed of the random check images. Defaults to 0.

    Returns:
        tuple[bytes, dict]: The serialised graph and, per checked ``(H, W)``, the relative
        error of each output.

    Raises:
        ExportError: The model does not export, or the graph computes something else (a
            graph specialised to the example size under ``dynamic``).
    """
    _register_symbolics()
    module.eval()  # not `module = module.eval()`: mmdet Swin's train() returns None
    generator = torch.Generator().manual_seed(seed)

    def image(size):
        return torch.rand(1, 3, *size, generator=generator) * 255

    example = image(shape)
    buffer = io.BytesIO()
    dynamic_axes = {'image': {2: 'height', 3: 'width'}} if dynamic else None
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(module, (example, ), buffer, dynamo=False, opset_version=opset,
                              input_names=['image'], output_names=output_names,
                              dynamic_axes=dynamic_axes)
    except ExportError:
        raise
    except Exception as error:
        raise ExportError(f'The exporter failed: {type(error).__name__}: {error}') from error
    graph = buffer.getvalue()
    sizes = [tuple(shape)]
    if dynamic:
        sizes.append(tuple(check_shape) if check_shape else (shape[0] + 32, shape[1] + 32))
    errors = {}
    for size in sizes:
        checked = example if size == sizes[0] else image(size)
        errors[size] = compare(_outputs(module, checked), run_onnx(graph, checked),
                               output_names)
        worst = max(errors[size].values())
        if worst > RELATIVE_TOLERANCE:
            if size != sizes[0]:
                reason = ('the graph is specialised to the example size (sizes computed in '
                          'Python became constants); export once per input size without '
                          '--dynamic')
            else:
                reason = 'the exported graph computes something else than the model'
            raise ExportError(f'{reason}. onnxruntime vs PyTorch at {size[0]}x{size[1]}: '
                              f'relative errors {errors[size]} (tolerance '
                              f'{RELATIVE_TOLERANCE})')
    if output is not None:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, 'wb') as file:
            file.write(graph)
    return graph, errors
