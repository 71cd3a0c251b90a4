"""Our backbone and its plain transcription with the same weights, by preset name.

Used by ``tools/analysis_tools/benchmark_targets.py`` to time the two side by side; both
are checked to compute the same function before they are timed.
"""
import copy
from typing import Callable, Dict, Tuple

from torch import nn

from mmsparsevit.models.backbones.lit import LIT, convert_lit_checkpoint
from mmsparsevit.models.backbones.vvt import VVT, convert_vvt_checkpoint
from transcriptions import PlainLIT, PlainLITTi, PlainVVT, plain_knn_backbone
from .model_builder import build_model, load_model_spec

Pair = Tuple[nn.Module, nn.Module]


def _vvt_pair(arch: str) -> Pair:
    plain = PlainVVT(**VVT.arch_zoo[arch])
    ours = VVT(arch=arch, drop_path_rate=0.)
    ours.load_state_dict(convert_vvt_checkpoint(plain.state_dict())[0], strict=True)
    return ours, plain


def _lit_pair(arch: str, table_img: int = 224) -> Pair:
    # Tables and position embeddings made for 224² inputs by default, as in the ImageNet
    # releases; the authors' COCO backbones make theirs for 800².
    plain = (PlainLITTi(arch, img=table_img)
             if arch == 'tiny' else PlainLIT(arch, table_img=table_img))
    ours = LIT(arch=arch, pretrain_img_size=table_img, drop_path_rate=0.)
    converted, _ = convert_lit_checkpoint(plain.state_dict())
    ours.load_state_dict(converted, strict=True)
    return ours, plain


def _kvt_pair(preset: str) -> Pair:
    ours = build_model(*load_model_spec(backbone=preset))
    return ours, plain_knn_backbone(copy.deepcopy(ours))


TRANSCRIBED: Dict[str, Callable[[], Pair]] = {
    'vvt-t': lambda: _vvt_pair('tiny'),
    'vvt-s': lambda: _vvt_pair('small'),
    'vvt-m': lambda: _vvt_pair('medium'),
    'vvt-l': lambda: _vvt_pair('large'),
    'lit-ti': lambda: _lit_pair('tiny'),
    'lit-s': lambda: _lit_pair('small'),
    'lit-m': lambda: _lit_pair('medium'),
    'lit-b': lambda: _lit_pair('base'),
    'lit-s-coco': lambda: _lit_pair('small', table_img=800),
    'kvt-swin-t': lambda: _kvt_pair('kvt-swin-t'),
    'kvt-pvtv2-b2': lambda: _kvt_pair('kvt-pvtv2-b2'),
}


def build_pair(name: str) -> Pair:
    """``(ours, plain)`` for a backbone preset, both in eval mode, with the same weights.

    Args:
        name (str): A key of ``TRANSCRIBED``.

    Returns:
        tuple[nn.Module, nn.Module]: Our backbone and its plain transcription.
    """
    if name not in TRANSCRIBED:
        raise KeyError(f'no plain transcription of {name!r}; transcribed: '
                       f'{", ".join(TRANSCRIBED)}')
    ours, plain = TRANSCRIBED[name]()
    ours.eval()
    plain.eval()
    return ours, plain
