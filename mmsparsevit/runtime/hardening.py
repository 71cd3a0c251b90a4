"""The failure behaviour every ``tools/train.py`` and ``tools/test.py`` run gets, applied to
its config.

Nothing here is hidden from the user: the tools log every change these functions make, as
config statements, when the run starts (:func:`~.cli.build_runner`).
"""
import copy
from typing import Any, List, Optional, Sequence

from mmengine.config import Config

from ..datasets.data_checks import leaf_datasets
from ..engine.atomic_io import ATOMIC_BACKEND
from .resume import find_resumable_checkpoint

__all__ = ['harden_train_config', 'harden_test_config']

_ENGINE_MODULE = 'mmsparsevit.engine'
_HOOKS = ('mmsparsevit.NonFiniteLossHook', 'mmsparsevit.DataAuditHook',
          'mmsparsevit.RandomStateHook')
_WEIGHTS_MATCH = 'mmsparsevit.WeightsMatchHook'
_SAMPLE_CHECK = 'mmsparsevit.CheckLoadedSample'
_ANNOTATION_LOADERS = ('LoadAnnotations', 'LoadPanopticAnnotations')
_IMAGE_LOADERS = ('LoadImageFromFile', )


def _type_name(transform: Any) -> str:
    kind = transform.get('type') if isinstance(transform, dict) else None
    name = kind.__name__ if isinstance(kind, type) else str(kind)
    return name.split('.')[-1]


def _decode_head(model: dict) -> Optional[dict]:
    head = model.get('decode_head')
    if isinstance(head, (list, tuple)):
        head = head[-1] if head else None
    return head if isinstance(head, dict) else None


def _with_sample_check(pipeline: List, check: dict) -> List:
    names = [_type_name(transform) for transform in pipeline]
    if _SAMPLE_CHECK.split('.')[-1] in names:
        return pipeline
    for loaders in (_ANNOTATION_LOADERS, _IMAGE_LOADERS):
        positions = [index for index, name in enumerate(names) if name in loaders]
        if positions:
            position = positions[-1] + 1
            return [*pipeline[:position], copy.deepcopy(check), *pipeline[position:]]
    return pipeline


def _hook_types(hooks: List) -> List[str]:
    return [str(hook.get('type')).split('.')[-1] for hook in hooks if isinstance(hook, dict)]


def _add_hooks(cfg: Config, hooks: List[dict]) -> None:
    """Append each hook whose type the config's ``custom_hooks`` do not list yet."""
    custom_hooks = list(cfg.get('custom_hooks') or [])
    present = _hook_types(custom_hooks)
    custom_hooks += [hook for hook in hooks if hook['type'].split('.')[-1] not in present]
    cfg.custom_hooks = custom_hooks


def _import_engine(cfg: Config) -> None:
    # Hooks and transforms resolve through the registry's scope, but the local_atomic file
    # backend does not: a config saved in the work dir must import it to run elsewhere.
    imports = cfg.get('custom_imports') or dict(imports=[], allow_failed_imports=False)
    modules = imports.get('imports', [])
    modules = [modules] if isinstance(modules, str) else list(modules)
    if _ENGINE_MODULE not in modules:
        imports['imports'] = modules + [_ENGINE_MODULE]
    cfg.custom_imports = imports


def _add_sample_checks(cfg: Config, phases: Sequence[str]) -> None:
    head = _decode_head(cfg.get('model') or {})
    check = dict(type=_SAMPLE_CHECK)
    if head is not None and 'num_classes' in head:
        check.update(num_classes=head['num_classes'], ignore_index=head.get('ignore_index', 255))
    for phase in phases:
        loader = cfg.get(f'{phase}_dataloader')
        for _, dataset in leaf_datasets((loader or {}).get('dataset')):
            if isinstance(dataset, dict) and isinstance(dataset.get('pipeline'), (list, tuple)):
                dataset['pipeline'] = _with_sample_check(list(dataset['pipeline']), check)


def harden_train_config(cfg: Config) -> Config:
    """Give a training config this package's failure behaviour (see docs/failure_behaviour.md).

    - checkpoints are written atomically (``default_hooks.checkpoint`` saves through the
      ``local_atomic`` file backend when it writes to a local folder);
    - a NaN/infinite loss stops training before it touches the weights
      (``NonFiniteLossHook``, unless the config already lists one, e.g. with
      ``action='skip'``);
    - every checkpoint keeps each rank's random generator states and resuming restores
      them, so a resumed run continues the interrupted one (``RandomStateHook``);
    - the training annotations are audited before the first iteration (``DataAuditHook``)
      and every loaded sample is checked (``CheckLoadedSample`` after the annotation loader
      of each pipeline);
    - a checkpoint loaded by ``load_from`` is converted to the model's layout and checked
      against it; one that fits only partly warns once with the counts (``WeightsMatchHook``
      with ``allow_partial=True``);
    - ``resume=True`` without ``load_from`` resumes from the newest *readable* checkpoint of
      the work dir (:func:`~mmsparsevit.runtime.resume.find_resumable_checkpoint`).

    Args:
        cfg (Config): A merged training config with ``work_dir`` set; changed in place.

    Returns:
        Config: ``cfg``.

    Raises:
        ResumeError: ``resume`` is set and the work dir holds only unusable checkpoints.
    """
    _import_engine(cfg)
    default_hooks = cfg.get('default_hooks')
    if default_hooks is None:
        cfg.default_hooks = default_hooks = dict()
    if 'checkpoint' not in default_hooks:
        default_hooks['checkpoint'] = dict(type='CheckpointHook', interval=1)
    checkpoint_hook = default_hooks['checkpoint']
    if (isinstance(checkpoint_hook, dict) and checkpoint_hook.get('backend_args') is None
            and checkpoint_hook.get('file_client_args') is None
            and '://' not in str(checkpoint_hook.get('out_dir') or '')):
        checkpoint_hook['backend_args'] = dict(backend=ATOMIC_BACKEND)

    _add_hooks(cfg, [dict(type=hook) for hook in _HOOKS] +
               [dict(type=_WEIGHTS_MATCH, allow_partial=True)])

    _add_sample_checks(cfg, ('train', 'val', 'test'))

    if cfg.get('resume') and cfg.get('load_from') is None:
        cfg.load_from = find_resumable_checkpoint(cfg.work_dir)
    return cfg


def harden_test_config(cfg: Config, allow_partial_checkpoint: bool = False) -> Config:
    """Check the checkpoint ``tools/test.py`` evaluates and every sample it evaluates on.

    The checkpoint is converted to the model's layout and must fit it (``WeightsMatchHook``):
    weights that would stay unloaded stop the run, unless ``allow_partial_checkpoint``. Every
    sample is checked (``CheckLoadedSample`` after the annotation loader of the test
    pipelines), as training runs do.

    A sample that fails stops the evaluation with the file named instead of scoring wrong
    boxes (an image of another size than its annotation records) or a wrong mIoU (labels
    outside the classes). The annotation audit stays with training: it reports what
    *training* drops, and the COCO evaluator reads the annotation file itself.

    Args:
        cfg (Config): A merged test config; changed in place.
        allow_partial_checkpoint (bool): Warn instead of stopping when the checkpoint leaves
            model weights unloaded. Defaults to False.

    Returns:
        Config: ``cfg``.
    """
    _import_engine(cfg)
    _add_hooks(cfg, [dict(type=_WEIGHTS_MATCH, allow_partial=allow_partial_checkpoint)])
    _add_sample_checks(cfg, ('test', ))
    return cfg
