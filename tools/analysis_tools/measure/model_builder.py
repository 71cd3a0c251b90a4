"""Build the model a cost tool measures and feed it a synthetic batch.

A tool measures either a *backbone* (called on an image tensor, returns stage maps) or a
*full model* (an mmdet detector or mmseg segmentor, run in ``mode='tensor'``: backbone,
neck and heads, without the data preprocessor or post-processing). Sources:

* a config file with ``model=dict(...)`` (detector, segmentor or a backbone dict) or a
  top-level ``backbone=dict(...)``; the config's ``default_scope`` decides which toolbox
  builds it;
* a backbone spec: a preset name of :mod:`measure.presets` or a dict literal
  such as ``"dict(type='mmsparsevit.VVT', arch='small')"``.

mmdet/mmseg are reached only through mmengine's registry (by scope), never imported here.
"""
import ast
import os.path as osp
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from mmengine.config import Config, ConfigDict
from mmengine.registry import MODELS, DefaultScope
from mmengine.structures import BaseDataElement
from torch import nn

from .presets import BACKBONE_PRESETS

ModelSpec = Tuple[ConfigDict, Optional[str]]


def parse_backbone_spec(spec: str) -> ModelSpec:
    """A preset name or a dict literal -> (backbone config, default scope)."""
    if spec in BACKBONE_PRESETS:
        return ConfigDict(BACKBONE_PRESETS[spec]), None
    try:
        value = _literal(ast.parse(spec.strip(), mode='eval').body)
    except (ValueError, SyntaxError) as error:
        raise ValueError(
            f'--backbone {spec!r} is neither a preset ({", ".join(BACKBONE_PRESETS)}) nor a '
            f'dict literal: {error}') from error
    if not isinstance(value, dict) or 'type' not in value:
        raise ValueError(f'--backbone {spec!r} must be a dict with a "type" key')
    return ConfigDict(value), None


def _literal(node: ast.AST) -> Any:
    """``ast.literal_eval`` that also accepts ``dict(key=value, ...)`` calls."""
    if isinstance(node, ast.Call) and getattr(node.func, 'id', None) == 'dict':
        if node.args:
            raise ValueError('dict(...) with positional arguments')
        return {keyword.arg: _literal(keyword.value) for keyword in node.keywords}
    if isinstance(node, ast.Dict):
        return {_literal(key): _literal(value) for key, value in zip(node.keys, node.values)}
    if isinstance(node, ast.List):
        return [_literal(element) for element in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_literal(element) for element in node.elts)
    return ast.literal_eval(node)


def load_model_spec(config: Optional[str] = None,
                    backbone: Optional[str] = None,
                    cfg_options: Optional[Dict[str, Any]] = None) -> ModelSpec:
    """Read the model config and default scope from a config file or a backbone spec."""
    if (config is None) == (backbone is None):
        raise ValueError('give exactly one of a config file and a backbone spec')
    if backbone is not None:
        return parse_backbone_spec(backbone)
    if not osp.isfile(config):
        raise FileNotFoundError(f'config file not found: {config}')
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if 'model' in cfg:
        model_cfg = cfg.model
    elif 'backbone' in cfg:
        model_cfg = cfg.backbone
    else:
        raise KeyError(f'{config} defines neither "model" nor "backbone"')
    if not isinstance(model_cfg, dict) or 'type' not in model_cfg:
        raise KeyError(f'{config}: the model config must be a dict with a "type" key')
    return ConfigDict(model_cfg), cfg.get('default_scope', None)


def build_model(model_cfg: ConfigDict, scope: Optional[str] = None) -> nn.Module:
    """Build ``model_cfg`` in ``scope`` (mmdet, mmseg, mmsparsevit or None) in eval mode."""
    import mmsparsevit.models  # noqa: F401  (registers this package's modules)
    model_cfg = ConfigDict(model_cfg)
    model_cfg.pop('pretrained', None)
    init_cfg = model_cfg.get('init_cfg')
    if isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained':
        model_cfg.init_cfg = None
    scope_name = scope or 'mmengine'
    with DefaultScope.overwrite_default_scope(scope_name):
        model = MODELS.build(model_cfg)
    # not `return model.eval()`: some backbones' train() (mmdet's Swin) returns None
    model.eval()
    return model


def is_full_model(model: nn.Module) -> bool:
    """Whether ``model`` is an OpenMMLab detector/segmentor (not a bare backbone)."""
    return hasattr(model, 'extract_feat') and hasattr(model, 'data_preprocessor')


def select_backbone(model: nn.Module, backbone_only: bool) -> nn.Module:
    """The model itself, or its ``backbone`` for ``backbone_only``."""
    if backbone_only and is_full_model(model):
        return model.backbone
    return model


def synthetic_batch(model: nn.Module,
                    shape: Sequence[int],
                    batch_size: int = 1,
                    device: Union[str, torch.device] = 'cpu',
                    in_channels: int = 3) -> Tuple[torch.Tensor, Optional[list]]:
    """A random normalised image batch and, for full models, data samples carrying the
    image meta-information heads read in ``mode='tensor'`` (RPN proposals need it)."""
    height, width = shape
    images = torch.randn(batch_size, in_channels, height, width, device=device)
    if not is_full_model(model):
        return images, None
    meta = dict(
        img_shape=(height, width),
        ori_shape=(height, width),
        pad_shape=(height, width),
        batch_input_shape=(height, width),
        scale_factor=(1.0, 1.0))
    return images, [BaseDataElement(metainfo=meta) for _ in range(batch_size)]


def forward_fn(model: nn.Module, images: torch.Tensor,
               data_samples: Optional[list]) -> Callable[[], Any]:
    """A closure running one forward pass the way the tools measure it."""
    if data_samples is None:
        return lambda: model(images)
    return lambda: model(images, data_samples, mode='tensor')


def sum_outputs(outputs: Any) -> Optional[torch.Tensor]:
    """Sum of every floating tensor that requires grad in nested outputs (None if there is
    none): the scalar the training benchmark back-propagates, which drives the same backward
    pass through the model as a loss would."""
    if isinstance(outputs, torch.Tensor):
        if outputs.is_floating_point() and outputs.requires_grad:
            return outputs.float().sum()
        return None
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, (list, tuple)):
        parts = [sum_outputs(item) for item in outputs]
        parts = [part for part in parts if part is not None]
        return sum(parts) if parts else None
    if isinstance(outputs, BaseDataElement):
        return sum_outputs([value for _, value in outputs.items()])
    return None
