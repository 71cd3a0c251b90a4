"""The authors' own VVT-S and LIT-S, imported from checkouts of their repositories.

Nothing of their code is part of this project: the benchmark is pointed at a checkout the
user made (``git clone https://github.com/OpenNLPLab/Vicinity-Vision-Transformer``,
``git clone https://github.com/zhuang-group/LIT``) and imports from it

* VVT-S: ``classification/vvt.py`` (``vvt_small``), run through the four stages of its
  ``forward_features`` (patch embedding, blocks, norm per stage), returning each stage's map
  instead of the final token mean, so that it does a backbone's work and its outputs can be
  compared with ours;
* LIT-S: the detection backbone ``detection/mmdet/models/backbones/lit.py`` (``LIT`` with
  the settings of their ``retinanet_fpn_lit_s.py``), compared as preset ``lit-s-coco``: its
  relative-position tables are made for 800² inputs, as in their COCO models.

Their LIT file imports mmdet 2.x, mmcv_custom and their CUDA-only deformable-convolution
extension. It is imported with stand-ins for exactly those names: mmdet's
``get_root_logger`` and ``BACKBONES`` registry and ``mmcv_custom.load_checkpoint`` (used
only when loading weights, which the benchmark does with ``load_state_dict``), and
``DeformConv2dPack`` on ``torchvision.ops.deform_conv2d`` with their parameter names (their
extension refuses to build without CUDA). The deformable convolution is therefore the same
kernel on both sides (our DTM uses it too); everything else runs as they wrote it.

Both models receive the weights of the plain transcription (:mod:`transcriptions`), whose
state dicts have the official layout, so the three implementations of a preset compute the
same function.
"""
import contextlib
import importlib.util
import io
import logging
import os
import sys
import types
from typing import Callable, Dict, Tuple

import torch
import torchvision
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

VVT_FILE = os.path.join('classification', 'vvt.py')
LIT_FILE = os.path.join('detection', 'mmdet', 'models', 'backbones', 'lit.py')
# Keyed by the preset of :mod:`measure.pairs` each authors' model is compared as: their LIT
# detection backbone makes its relative-position tables for 800² inputs.
AUTHORS_FILES = {'vvt-s': VVT_FILE, 'lit-s-coco': LIT_FILE}
REPOSITORIES = {
    'vvt-s': 'https://github.com/OpenNLPLab/Vicinity-Vision-Transformer',
    'lit-s-coco': 'https://github.com/zhuang-group/LIT',
}
# The LIT-S backbone of the authors' detection configs (retinanet_fpn_lit_s.py).
_LIT_S_SETTINGS = dict(
    embed_dim=96,
    depths=[2, 2, 6, 2],
    num_heads=[3, 6, 12, 24],
    window_size=7,
    mlp_ratio=4.,
    qkv_bias=True,
    qk_scale=None,
    drop_rate=0.,
    attn_drop_rate=0.,
    drop_path_rate=0.,
    ape=False,
    patch_norm=True,
    out_indices=(0, 1, 2, 3),
    use_checkpoint=False)


def authors_file(name: str, repo: str) -> str:
    """The file of ``name``'s model in the checkout ``repo``; a clear error if it is absent."""
    if name not in AUTHORS_FILES:
        raise KeyError(f'no authors\' code is wired for {name!r}; available: '
                       f'{", ".join(AUTHORS_FILES)}')
    path = os.path.join(repo, AUTHORS_FILES[name])
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f'{path} not found: pass a checkout of {REPOSITORIES[name]} for {name}')
    return path


class _DeformConv2dPack(nn.Module):
    """Their ``DeformConv2dPack`` (offsets from a plain convolution, then the deformable
    convolution with bias), on torchvision's kernel, with their parameter names and their
    ``forward(x, return_offset)`` returning ``(out, offset or None)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 padding: int, dilation: int = 1, groups: int = 1, deformable_groups: int = 1,
                 im2col_step: int = 32, bias: bool = True, lr_mult: float = 0.1) -> None:
        super().__init__()
        self.stride, self.padding = _pair(stride), _pair(padding)
        self.dilation = _pair(dilation)
        kernel = _pair(kernel_size)
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels // groups, *kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.conv_offset = nn.Conv2d(in_channels, deformable_groups * 2 * kernel[0] * kernel[1],
                                     kernel, stride=stride, padding=padding, bias=True)
        # Their init_offset: training starts from the regular sampling grid.
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor, return_offset: bool = False) -> Tuple[Tensor, Tensor]:
        offset = self.conv_offset(x)
        out = torchvision.ops.deform_conv2d(
            x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
            dilation=self.dilation)
        return out, (offset if return_offset else None)


class _Registry:
    """Stands in for mmdet 2.x's ``BACKBONES``: registering leaves the class as it is."""

    @staticmethod
    def register_module(*args, **kwargs) -> Callable:
        return lambda cls: cls


def _load_checkpoint(*args, **kwargs):
    raise NotImplementedError('the benchmark loads weights with load_state_dict')


def _package(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []
    module.__dict__.update(attributes)
    return module


def _lit_stand_ins() -> Dict[str, types.ModuleType]:
    return {
        'mmcv_custom': _package('mmcv_custom', load_checkpoint=_load_checkpoint),
        'mmdet.utils': _package('mmdet.utils', get_root_logger=logging.getLogger),
        'mm_modules': _package('mm_modules'),
        'mm_modules.DCN': _package('mm_modules.DCN'),
        'mm_modules.DCN.modules': _package('mm_modules.DCN.modules'),
        'mm_modules.DCN.modules.deform_conv2d': _package(
            'mm_modules.DCN.modules.deform_conv2d', DeformConv2dPack=_DeformConv2dPack),
        'authors_lit': _package('authors_lit'),
        'authors_lit.models': _package('authors_lit.models'),
        'authors_lit.models.builder': _package('authors_lit.models.builder',
                                               BACKBONES=_Registry()),
        'authors_lit.models.backbones': _package('authors_lit.models.backbones'),
    }


_IMPORTED: Dict[str, types.ModuleType] = {}


def _import_file(path: str, module_name: str,
                 stand_ins: Dict[str, types.ModuleType]) -> types.ModuleType:
    """Import ``path`` as ``module_name`` with ``stand_ins`` in ``sys.modules`` meanwhile.

    The stand-ins are removed afterwards (a real module they shadowed is put back); the
    imported module keeps the names it bound. Their prints at import go to a buffer.
    """
    if module_name in _IMPORTED:
        return _IMPORTED[module_name]
    shadowed = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        # timm's register_model looks the defining module up in sys.modules.
        sys.modules[module_name] = module
        with contextlib.redirect_stdout(io.StringIO()):
            spec.loader.exec_module(module)
    finally:
        for name, original in shadowed.items():
            if original is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = original
    _IMPORTED[module_name] = module
    return module


class AuthorsVVTBackbone(nn.Module):
    """The authors' classification VVT-S run as a four-stage backbone.

    The per-stage loop is the one of their ``forward_features``; it returns the normed map of
    every stage, (B, C, H, W), instead of the mean token of the last one.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        batch, outs = x.shape[0], []
        for index in range(1, self.model.num_stages + 1):
            x, height, width = getattr(self.model, f'patch_embed{index}')(x)
            for block in getattr(self.model, f'block{index}'):
                x = block(x, height, width)
            x = getattr(self.model, f'norm{index}')(x)
            x = x.reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()
            outs.append(x)
        return tuple(outs)


def _load_official_weights(model: nn.Module, state_dict: Dict[str, Tensor],
                           unused_prefixes: Tuple[str, ...] = ()) -> nn.Module:
    """Load an official-layout state dict; every parameter and buffer of ``model`` must be in
    it (except keys under ``unused_prefixes``) and nothing may be left over."""
    own = model.state_dict()
    missing = [key for key in own if key not in state_dict and not key.startswith(unused_prefixes)]
    unexpected = [key for key in state_dict if key not in own]
    if missing or unexpected:
        raise RuntimeError(f'the official-layout weights do not fit the authors\' model: '
                           f'missing {missing[:5]}, unexpected {unexpected[:5]}')
    model.load_state_dict(state_dict, strict=False)
    return model


def build_authors_model(name: str, repo: str, official_state_dict: Dict[str, Tensor]) -> nn.Module:
    """The authors' model of ``name`` from the checkout ``repo``, with the given weights.

    Args:
        name (str): 'vvt-s' or 'lit-s-coco' (a key of ``AUTHORS_FILES``).
        repo (str): Root of a checkout of the authors' repository.
        official_state_dict (dict): Weights in the official checkpoint layout (the plain
            transcription's state dict).

    Returns:
        nn.Module: A backbone returning the four stage maps, in eval mode.
    """
    path = authors_file(name, repo)
    if name == 'vvt-s':
        module = _import_file(path, 'authors_vvt', {})
        with contextlib.redirect_stdout(io.StringIO()):
            classifier = module.vvt_small(drop_path_rate=0.)
        _load_official_weights(classifier, official_state_dict, unused_prefixes=('head.', ))
        model = AuthorsVVTBackbone(classifier)
    else:
        module = _import_file(path, 'authors_lit.models.backbones.lit', _lit_stand_ins())
        model = _load_official_weights(module.LIT(**_LIT_S_SETTINGS), official_state_dict)
    # Their LIT.train() returns None, so eval() cannot be chained.
    model.eval()
    return model
