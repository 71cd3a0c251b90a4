# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Whole-model checkpoints of detectors and segmentors, converted to the model they load into.

The LIT authors released RetinaNet and Mask R-CNN (COCO) and Semantic FPN (ADE20K) models
trained with their copies of mmdet 2.11 and mmseg 0.13 (zhuang-group/LIT, ``detection/`` and
``segmentation/``). These are mmcv 1.x files, ``{'meta', 'state_dict', 'optimizer'}`` (plus
``'amp'`` from the Swin-style runner of the LIT-S detectors), whose ``backbone.*`` keys are in
the authors' backbone layout and whose other keys (``neck.*``, ``bbox_head.*``, ``rpn_head.*``,
``roi_head.*``, ``decode_head.*``) are mmdet 2.x / mmseg 0.x module names.

:func:`convert_dense_checkpoint` puts such a file into the layout of an mmdet 3.x / mmseg 1.x
model: the ``backbone.`` part goes through the backbone's own converter, every other key is
carried over as it is.

Neck and head layouts: no mapping is needed. The key names and shapes of the modules these four
models use were compared between the vendored 2.11 / 0.13 sources and the installed mmdet 3.3.0
/ mmseg 1.2.2, and they agree entry for entry:

- FPN neck: ``detection/mmdet/models/necks/fpn.py`` and
  ``segmentation/mmseg/models/necks/fpn.py`` vs ``mmdet/models/necks/fpn.py`` and
  ``mmseg/models/necks/fpn.py``: ``lateral_convs.<i>.conv`` and ``fpn_convs.<i>.conv``
  (mmcv ``ConvModule`` without norm, so with bias), the ``add_extra_convs='on_input'`` extra
  convolution of RetinaNet at ``fpn_convs.<3>`` taking the last backbone channels.
- RetinaNet head: ``dense_heads/retina_head.py`` (and ``anchor_head.py``) in both:
  ``cls_convs.<i>.conv``, ``reg_convs.<i>.conv``, ``retina_cls`` (9 anchors x 80 classes,
  sigmoid), ``retina_reg`` (9 x 4).
- RPN head: ``dense_heads/rpn_head.py`` in both: ``rpn_conv`` (a bare ``nn.Conv2d`` in 3.3
  with the default ``num_convs=1``, as in 2.11), ``rpn_cls`` (3 anchors x 1), ``rpn_reg``.
- RoI head: ``roi_heads/standard_roi_head.py``, ``roi_heads/bbox_heads/convfc_bbox_head.py``
  and ``bbox_head.py``, ``roi_heads/mask_heads/fcn_mask_head.py`` in both:
  ``bbox_head.shared_fcs.{0,1}``, ``bbox_head.fc_cls`` (81), ``bbox_head.fc_reg`` (4 x 80),
  ``mask_head.convs.<i>.conv``, ``mask_head.upsample`` (transposed convolution),
  ``mask_head.conv_logits`` (80). The RoI extractors have no parameters.
- Semantic FPN head: ``segmentation/mmseg/models/decode_heads/fpn_head.py`` and
  ``decode_head.py`` vs ``mmseg/models/decode_heads/fpn_head.py`` and ``decode_head.py``:
  ``scale_heads.<i>.<j>.conv`` and ``.bn`` (SyncBN; ``j`` steps over the parameter-free
  upsampling layers in the same positions), ``conv_seg`` (150 classes). There is no
  auxiliary head.

The mmdet 3.x / mmseg 1.x data preprocessors keep their mean and std as non-persistent
buffers, and no loss module has parameters, so the models expect nothing else.
"""
from collections import OrderedDict
from typing import Mapping

from mmengine.model import is_model_wrapper
from torch import Tensor, nn

from mmsparsevit.utils.state_dict import strip_prefix, unwrap_state_dict
from .backbones.base import ConvertedCheckpoint, SparseViTBackbone

__all__ = ['convert_dense_checkpoint']

BACKBONE_PREFIX = 'backbone.'
# Room for the first keys of a converter's error; it lists every key it could not place.
_MESSAGE_LIMIT = 600


def _clip(text: str, limit: int = _MESSAGE_LIMIT) -> str:
    return text if len(text) <= limit else text[:limit] + ' ...'


def convert_dense_checkpoint(
        checkpoint: Mapping,
        model: nn.Module) -> ConvertedCheckpoint:
    """Convert a detector's or segmentor's whole-model checkpoint to ``model``'s layout.

    Pure function: nothing is read from disk and neither argument is changed; ``model`` only
    lends its backbone type and parameter shapes, so it may live on the meta device.

    - ``backbone.*`` keys go through the backbone's
      :meth:`~mmsparsevit.models.backbones.base.SparseViTBackbone.convert_state_dict`: its
      converter (:func:`~mmsparsevit.models.backbones.lit.convert_lit_checkpoint`,
      :func:`~mmsparsevit.models.backbones.vvt.convert_vvt_checkpoint`), then its
      adaptation to the model (LIT: position embeddings and relative-position tables resized
      to the model's ``pretrain_img_size``). Keys of any other backbone are kept.
    - Every other key is kept as it is: the neck and head layouts of the authors' mmdet 2.11 /
      mmseg 0.13 RetinaNet, Mask R-CNN and Semantic FPN equal those of mmdet 3.3 / mmseg 1.2
      (see the module docstring for the modules compared).

    A checkpoint already in the model's layout (an mmsparsevit-trained detector or segmentor)
    comes back with the same keys, in the same order, holding the same tensors, and no notes.
    Whether the result fits ``model`` key for key is for the caller to check, e.g. with
    :func:`mmsparsevit.utils.state_dict.match_state_dict`.

    Args:
        checkpoint (Mapping): A loaded checkpoint (mmcv 1.x / mmengine: the state dict under
            ``state_dict``; a ``module.`` prefix is removed) or a bare state dict.
        model (nn.Module): The mmdet 3.x detector or mmseg 1.x segmentor to load into, or a
            model wrapper around it.

    Returns:
        tuple[OrderedDict[str, Tensor], dict[str, str]]: The state dict in the model's layout
        (the backbone's entries where the checkpoint's first ``backbone.`` key was, the others
        in the checkpoint's order), and notes mapping a key to what happened to it: checkpoint
        keys that were not carried over (classification head, class-token row of LIT-Ti's
        ``pos_embed4``, ``relative_position_index`` buffers, ...) and model keys whose tensor
        was resized, each with the reason.

    Raises:
        TypeError: ``checkpoint`` is not a mapping.
        ValueError: The ``backbone.`` part cannot be converted to the model's backbone (a
            checkpoint of another architecture); the message names the first keys that
            found no place.
    """
    state_dict = unwrap_state_dict(checkpoint)
    if is_model_wrapper(model):
        model = model.module
    backbone = getattr(model, 'backbone', None)
    source = strip_prefix(state_dict, BACKBONE_PREFIX)
    if not isinstance(backbone, SparseViTBackbone) or not source:
        return OrderedDict(state_dict), {}

    try:
        backbone_state, backbone_notes = backbone.convert_state_dict(source)
    except ValueError as error:
        raise ValueError(
            f'the {BACKBONE_PREFIX}* entries of the checkpoint do not convert to the model\'s '
            f'{type(backbone).__name__} backbone (a checkpoint of another architecture?): '
            f'{_clip(str(error))}') from error

    converted: 'OrderedDict[str, Tensor]' = OrderedDict()
    placed = False
    for key, value in state_dict.items():
        if not key.startswith(BACKBONE_PREFIX):
            converted[key] = value
        elif not placed:
            converted.update((BACKBONE_PREFIX + name, tensor)
                             for name, tensor in backbone_state.items())
            placed = True
    notes = {BACKBONE_PREFIX + key: note for key, note in backbone_notes.items()}
    return converted, notes
