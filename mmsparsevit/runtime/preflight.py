# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Checks run by the tools before a runner is built.

Bad input should stop a run at once with a message that names the file or the
config key at fault, not with a stack trace from deep inside a data loader
worker or a neck's forward. The checks only use mmengine registries, so they
serve mmdet and mmseg configs alike (the config's ``default_scope`` decides).
"""
import inspect
import os
import os.path as osp
import re
from typing import Any, Iterator, List, Optional, Tuple

import torch
from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log
from mmengine.registry import DATASETS, MODELS, DefaultScope

from ..datasets.data_checks import DataCheckError, check_coco_file, leaf_datasets

# Spatial size of the dummy input used to read the backbone's output channels.
_PROBE_SIZE = 128
# mmcv's LoadImageFromFile reports an image it could not decode with this message.
_UNDECODABLE_IMAGE = re.compile(r'failed to load image: (\S+)')


class ConfigCheckError(ValueError):
    """A config points at missing or malformed data, or its parts do not fit together."""


def check_config(cfg: Config, mode: str) -> None:
    """Check what a train or test run would read before anything is built.

    Args:
        cfg (Config): The fully merged config.
        mode (str): ``'train'`` checks the training data (and the validation
            data when ``val_cfg`` is set); ``'test'`` checks the test data.

    Raises:
        ConfigCheckError: Naming the config key and the file at fault.
    """
    if mode not in ('train', 'test'):
        raise ValueError(f'mode must be "train" or "test", got {mode!r}')
    phases = ['train', 'val'] if mode == 'train' and cfg.get('val_cfg') else [mode]
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
        for phase in phases:
            loader = cfg.get(f'{phase}_dataloader')
            if loader and loader.get('dataset'):
                leaves = leaf_datasets(loader['dataset'], f'{phase}_dataloader.dataset')
                for key, dataset in leaves:
                    check_dataset(dataset, key, need_annotations=phase != 'test')
            for key, metric in _as_keyed_list(cfg.get(f'{phase}_evaluator'),
                                              f'{phase}_evaluator'):
                check_metric_annotations(metric, key)
        check_backbone_channels(cfg)


def _as_keyed_list(item: Any, key: str) -> Iterator[Tuple[str, Any]]:
    if isinstance(item, (list, tuple)):
        for index, element in enumerate(item):
            yield f'{key}[{index}]', element
    elif item:
        yield key, item


def _is_remote(path: str, backend_args: Optional[dict]) -> bool:
    backend = (backend_args or {}).get('backend', 'local')
    return '://' in path or backend != 'local' or bool((backend_args or {}).get('path_mapping'))


def _resolve(data_root: str, path: str) -> str:
    """Join like mmengine's ``BaseDataset._join_prefix``."""
    return osp.join(data_root, path) if data_root and not osp.isabs(path) else path


def _dataset_class(dataset: dict) -> Optional[type]:
    dataset_type = dataset.get('type')
    if isinstance(dataset_type, type):
        return dataset_type
    try:
        with DATASETS.switch_scope_and_registry(None) as registry:
            return registry.get(dataset_type)
    except Exception:  # an unknown type is reported by the runner's own build
        return None


def _init_default(cls: Optional[type], name: str, fallback: Any) -> Any:
    if cls is None:
        return fallback
    parameter = inspect.signature(cls.__init__).parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return fallback
    return parameter.default


def _is_coco_dataset(cls: Optional[type]) -> bool:
    # mmdet's CocoDataset and all its subclasses read through a COCO api class.
    return cls is not None and getattr(cls, 'COCOAPI', None) is not None


def _check_coco_file(path: str, key: str, **kwargs) -> None:
    """:func:`~mmsparsevit.datasets.check_coco_file`, its message prefixed with ``key``."""
    try:
        check_coco_file(path, **kwargs)
    except DataCheckError as err:
        raise ConfigCheckError(f'{key}: {err}') from None


def check_dataset(dataset: dict, key: str, need_annotations: bool = True) -> None:
    """Check that a dataset config points at existing, well-formed data.

    Args:
        dataset (dict): A dataset config (not a wrapper).
        key (str): Its key in the config, used in messages.
        need_annotations (bool): Whether a COCO file must hold annotations
            (test-dev style files list images only). Defaults to True.

    Raises:
        ConfigCheckError: For a missing ``data_root``, ``ann_file`` or
            ``data_prefix`` folder, an image folder without images, or a COCO
            dataset whose annotation file breaks a rule of
            :func:`~mmsparsevit.datasets.check_coco_file`.
    """
    data_root = dataset.get('data_root') or ''
    backend_args = dataset.get('backend_args')
    if _is_remote(data_root, backend_args):
        return
    if data_root and not osp.isdir(data_root):
        raise ConfigCheckError(f'{key}.data_root: dataset folder {data_root} does not exist')
    cls = _dataset_class(dataset)
    ann_file = dataset.get('ann_file') or ''
    if ann_file:
        ann_path = _resolve(data_root, ann_file)
        if not osp.isfile(ann_path):
            raise ConfigCheckError(f'{key}.ann_file: annotation file {ann_path} does not exist')
    data_prefix = dataset.get('data_prefix') or {}
    for name, prefix in data_prefix.items():
        if not prefix:
            continue
        folder = _resolve(data_root, prefix)
        if not osp.isdir(folder):
            raise ConfigCheckError(f'{key}.data_prefix.{name}: folder {folder} does not exist')
    if _is_coco_dataset(cls) and ann_file:
        metainfo = dataset.get('metainfo') or getattr(cls, 'METAINFO', {})
        _check_coco_file(_resolve(data_root, ann_file), f'{key}.ann_file',
                         classes=metainfo.get('classes'), need_annotations=need_annotations,
                         img_prefix=_resolve(data_root, data_prefix.get('img') or ''))
    img_folder = data_prefix.get('img_path')
    if img_folder is not None and not ann_file:
        # Segmentation datasets without a split file list their image folder instead.
        suffix = dataset.get('img_suffix') or _init_default(cls, 'img_suffix', '.jpg')
        folder = _resolve(data_root, img_folder)
        if not _contains_file(folder, suffix):
            raise ConfigCheckError(
                f'{key}.data_prefix.img_path: no "{suffix}" images in {folder}')


def _contains_file(folder: str, suffix: str) -> bool:
    for _, _, files in os.walk(folder):
        if any(name.endswith(suffix) for name in files):
            return True
    return False


def check_metric_annotations(metric: dict, key: str) -> None:
    """Check the ground-truth file an evaluator reads (e.g. CocoMetric's ``ann_file``)."""
    ann_file = metric.get('ann_file') if isinstance(metric, dict) else None
    if not ann_file or _is_remote(ann_file, metric.get('backend_args')):
        return
    if not osp.isfile(ann_file):
        raise ConfigCheckError(f'{key}.ann_file: annotation file {ann_file} does not exist')
    if 'coco' in str(metric.get('type', '')).lower():
        _check_coco_file(ann_file, f'{key}.ann_file')


def backbone_out_channels(backbone_cfg: dict) -> List[int]:
    """Build a backbone and read the channels of its outputs from a dummy forward.

    Args:
        backbone_cfg (dict): ``model.backbone`` of a config; built in the
            current default scope.

    Returns:
        list[int]: Channels of each returned feature map, in order.
    """
    backbone = MODELS.build(ConfigDict(backbone_cfg))
    backbone.eval()
    probe = torch.zeros(1, backbone_cfg.get('in_channels', 3), _PROBE_SIZE, _PROBE_SIZE)
    with torch.no_grad():
        outputs = backbone(probe)
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs, )
    return [int(output.shape[1]) for output in outputs]


def _channel_consumers(model: dict) -> List[Tuple[str, Any, Any]]:
    """``(key, in_channels, in_index)`` of the modules that read the backbone's outputs."""
    neck = model.get('neck')
    if isinstance(neck, (list, tuple)):
        neck = neck[0] if neck else None
    if neck:
        return [('model.neck', neck['in_channels'], None)] if 'in_channels' in neck else []
    consumers = []
    for head_key in ('decode_head', 'auxiliary_head'):
        for key, head in _as_keyed_list(model.get(head_key), f'model.{head_key}'):
            if 'in_channels' in head and 'in_index' in head:
                consumers.append((key, head['in_channels'], head['in_index']))
    return consumers


def check_backbone_channels(cfg: Config) -> None:
    """Check that the neck (or, without one, the heads) expects the backbone's channels.

    Args:
        cfg (Config): The config; its backbone is built in the config's
            default scope (call inside it).

    Raises:
        ConfigCheckError: Naming the ``in_channels`` key, its value and the
            backbone's actual output channels.
    """
    model = cfg.get('model') or {}
    backbone = model.get('backbone')
    consumers = _channel_consumers(model)
    if not backbone or not consumers:
        return
    try:
        channels = backbone_out_channels(backbone)
    except KeyError as err:
        raise ConfigCheckError(f'model.backbone: cannot build {backbone.get("type")!r}: '
                               f'{err}') from None
    except Exception as err:  # a backbone that cannot take the probe is left to the run
        print_log(f'skipped the backbone/neck channel check: the backbone did not run on a '
                  f'{_PROBE_SIZE}x{_PROBE_SIZE} input ({err})', logger='current')
        return
    for key, in_channels, in_index in consumers:
        if in_index is None:
            expected = channels if isinstance(in_channels, (list, tuple)) else channels[-1]
        elif isinstance(in_index, (list, tuple)):
            expected = [channels[i] for i in in_index]
        else:
            expected = channels[in_index]
        actual = list(in_channels) if isinstance(in_channels, (list, tuple)) else in_channels
        if actual != expected:
            raise ConfigCheckError(
                f'{key}.in_channels = {actual} does not match the backbone: '
                f'{backbone.get("type")} returns maps with {channels} channels'
                f'{"" if in_index is None else f" (read at in_index {in_index})"}; '
                f'set {key}.in_channels={expected}')


def describe_data_error(error: BaseException) -> Optional[str]:
    """Say which file broke a run, for errors raised while loading samples.

    Errors from data loader workers arrive re-raised with the worker's
    traceback as their message; this extracts the file they name.

    Args:
        error (BaseException): An error raised by ``runner.train()``/``test()``.

    Returns:
        str | None: A one-line description, or None for other errors.
    """
    match = _UNDECODABLE_IMAGE.search(str(error))
    if match:
        return f'cannot decode image {match.group(1)}: the file is corrupt or not an image'
    return None
