"""Inference API: a detector or segmentor of a config with a checkpoint's weights."""
from typing import Union

import torch.nn as nn
from mmengine.config import Config
from mmengine.runner.checkpoint import CheckpointLoader

from ..engine import match_checkpoint_to_model

__all__ = ['init_model', 'load_weights']


def load_weights(model: nn.Module, checkpoint: str, allow_partial: bool = False) -> None:
    """Load ``checkpoint`` (path or URL, our layout or the LIT authors' mmdet 2.x / mmseg 0.x
    files) into ``model``; the class names (and palette) stored with it become the model's.

    Raises:
        WeightsMismatchError: Model weights would stay unloaded and ``allow_partial`` is
            False (see :func:`~mmsparsevit.engine.match_checkpoint_to_model`).
    """
    loaded = CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu')
    match_checkpoint_to_model(model, loaded, source=checkpoint, allow_partial=allow_partial)
    own = model.state_dict()
    model.load_state_dict({key: value for key, value in loaded['state_dict'].items()
                           if key in own and own[key].shape == value.shape}, strict=False)
    meta = loaded.get('meta') if isinstance(loaded.get('meta'), dict) else {}
    if 'dataset_meta' in meta:
        model.dataset_meta = {key.lower(): value for key, value in meta['dataset_meta'].items()}
    elif 'CLASSES' in meta:  # mmdet 2.x / mmseg 0.x
        model.dataset_meta = {'classes': meta['CLASSES']}
        if meta.get('PALETTE') is not None:
            model.dataset_meta['palette'] = meta['PALETTE']


def init_model(cfg: Union[str, Config], checkpoint: str, device: str = 'cpu',
               allow_partial: bool = False) -> nn.Module:
    """Build the config's model through its toolbox (``default_scope`` mmdet or mmseg), load
    ``checkpoint`` with :func:`load_weights` and put it on ``device`` in eval mode."""
    cfg = Config.fromfile(cfg) if isinstance(cfg, str) else cfg
    scope = cfg.get('default_scope')
    if scope == 'mmdet':
        from mmdet.apis import init_detector as build
    elif scope == 'mmseg':
        from mmseg.apis import init_model as build
    else:
        raise ValueError(f'{cfg.filename}: default_scope is {scope!r}; expected an mmdet '
                         'detector or an mmseg segmentor')
    model = build(cfg, None, device='cpu')
    load_weights(model, checkpoint, allow_partial)
    return model.to(device).eval()
