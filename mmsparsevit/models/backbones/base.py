# Copyright (c) mmsparsevit contributors. All rights reserved.
"""The contract every mmsparsevit backbone keeps, written once.

Presets and custom architectures, ``out_indices``, ``frozen_stages``, ``norm_eval``,
``with_cp``, the stochastic-depth schedule and ``init_cfg``: the authors' initialisation, and
``Pretrained`` checkpoints in any layout the backbone's converter knows, checked strictly.
"""
import re
from abc import abstractmethod
from collections import OrderedDict
from itertools import islice
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from mmengine.logging import MMLogger
from mmengine.model import BaseModule
from mmengine.model.weight_init import constant_init, trunc_normal_init
from mmengine.runner.checkpoint import CheckpointLoader
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmsparsevit.utils.state_dict import match_state_dict, strip_prefix, unwrap_state_dict

__all__ = ['ConvertedCheckpoint', 'SparseViTBackbone']

# A state dict in a backbone's layout, and notes: key -> what happened to it and why.
ConvertedCheckpoint = Tuple['OrderedDict[str, Tensor]', Dict[str, str]]


def _is_sequence(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


class SparseViTBackbone(BaseModule):
    """Base of the mmsparsevit backbones: a pyramid of stages emitting NCHW maps.

    A subclass sets the ``arch_*`` class attributes, implements :meth:`convert_state_dict`,
    :meth:`stem_modules` and :meth:`stage_modules`, builds its layers after
    ``super().__init__()`` (which sets ``arch_settings``, ``num_stages``, ``num_features``,
    ``out_indices``, ``frozen_stages``, ``norm_eval``, ``with_cp`` and ``drop_path_rates``) and
    ends its ``__init__`` with ``self._freeze_stages()``.

    Class attributes:
        arch_zoo (dict[str, dict]): Presets by lower-case name; an alias is another key bound
            to the same dict.
        arch_stage_keys (tuple[str]): Keys a custom arch must have, one value per stage.
            ``'depths'`` (blocks per stage) and ``'embed_dims'`` (channels) are among them.
        arch_stage_defaults (dict): Optional per-stage keys and the value each stage gets when
            the key is absent.
        arch_defaults (dict): Optional whole-model keys and their defaults.
        optional_keys (tuple[str]): Patterns (:func:`re.fullmatch`) of the model keys that a
            ``Pretrained`` checkpoint may lack; they keep their initialisation.

    Args:
        arch (str | dict): A preset name (any case) or a dict of the keys above.
        out_indices (int | Sequence[int]): Stages whose outputs are returned; negative indices
            count from the last stage.
        frozen_stages (int): ``-1`` freezes nothing, ``0`` the stem, ``k > 0`` the stem and
            stages ``0..k-1``: in eval mode with ``requires_grad=False``, also after
            :meth:`train`. Defaults to -1.
        norm_eval (bool): Keep the norms with running statistics (BatchNorm, SyncBatchNorm) in
            eval mode while training, so their statistics stay frozen. LayerNorm and GroupNorm
            have none and are not affected. Defaults to False.
        drop_path_rate (float): Stochastic depth rate of the last block, increasing linearly
            from 0 over all blocks. Defaults to 0.
        with_cp (bool): Activation checkpointing of every block. Defaults to False.
        init_cfg (dict | list[dict], optional): mmengine initialisation configs, applied after
            the authors' initialisation; ``dict(type='Pretrained', checkpoint=PATH,
            prefix=None)`` entries are loaded last by :meth:`load_pretrained`. Defaults to None.
    """

    arch_zoo: Dict[str, dict] = {}
    arch_stage_keys: Tuple[str, ...] = ('embed_dims', 'depths', 'num_heads', 'mlp_ratios')
    arch_stage_defaults: Dict[str, Any] = {}
    arch_defaults: Dict[str, Any] = {}
    optional_keys: Tuple[str, ...] = ()

    def __init__(self,
                 arch: Union[str, dict],
                 out_indices: Union[int, Sequence[int]],
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 drop_path_rate: float = 0.,
                 with_cp: bool = False,
                 init_cfg: Union[dict, List[dict], None] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.arch_settings = self.parse_arch(arch)
        depths = self.arch_settings['depths']
        self.num_stages = len(depths)
        self.num_features = self.arch_settings['embed_dims']
        self.out_indices = self.parse_out_indices(out_indices, self.num_stages)
        if not -1 <= frozen_stages <= self.num_stages:
            raise ValueError(f'{type(self).__name__}: frozen_stages must be in '
                             f'[-1, {self.num_stages}], got {frozen_stages}')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        total = sum(depths)
        rates = iter([drop_path_rate * i / max(total - 1, 1) for i in range(total)])
        self.drop_path_rates = tuple(tuple(islice(rates, depth)) for depth in depths)

    @classmethod
    def parse_arch(cls, arch: Union[str, Mapping]) -> Dict[str, Any]:
        """Settings of a preset or a custom arch, per-stage values as tuples.

        Raises:
            KeyError: Unknown preset, or a custom arch with missing or unknown keys (named,
                with the keys that are allowed).
            TypeError: ``arch`` is neither a str nor a dict.
            ValueError: A per-stage entry does not have one value per stage.
        """
        name = cls.__name__
        if isinstance(arch, str):
            if arch.lower() not in cls.arch_zoo:
                raise KeyError(f'unknown {name} arch {arch!r}; choose one of '
                               f'{sorted(cls.arch_zoo)} or pass a dict')
            arch = cls.arch_zoo[arch.lower()]
        elif not isinstance(arch, Mapping):
            raise TypeError(f'{name}: arch must be a str or a dict, got {type(arch).__name__}')
        optional = [*cls.arch_stage_defaults, *cls.arch_defaults]
        missing = [key for key in cls.arch_stage_keys if key not in arch]
        unknown = sorted(set(arch) - set(cls.arch_stage_keys) - set(optional))
        if missing or unknown:
            raise KeyError(f'custom {name} arch: missing keys {missing}, unknown keys {unknown}; '
                           f'required {list(cls.arch_stage_keys)}, optional {optional}')
        if not _is_sequence(arch['depths']) or not arch['depths']:
            raise ValueError(f"custom {name} arch: 'depths' must list the blocks of each stage, "
                             f"got {arch['depths']!r}")
        num_stages = len(arch['depths'])
        settings = {key: arch.get(key, default) for key, default in cls.arch_defaults.items()}
        for key in (*cls.arch_stage_keys, *cls.arch_stage_defaults):
            value = arch.get(key, (cls.arch_stage_defaults.get(key), ) * num_stages)
            if not _is_sequence(value) or len(value) != num_stages:
                raise ValueError(f'custom {name} arch: {key!r} must list one value per stage '
                                 f"({num_stages} stages from 'depths'), got {value!r}")
            settings[key] = tuple(value)
        return settings

    @staticmethod
    def parse_out_indices(out_indices: Union[int, Sequence[int]],
                          num_stages: int) -> Tuple[int, ...]:
        """``out_indices`` as a sorted tuple of distinct non-negative stage indices.

        Raises:
            TypeError: Neither an int nor a non-empty sequence.
            ValueError: An index outside ``-num_stages..num_stages - 1`` (named).
        """
        if isinstance(out_indices, int):
            out_indices = (out_indices, )
        if not _is_sequence(out_indices) or len(out_indices) == 0:
            raise TypeError(f'out_indices must be an int or a non-empty sequence of ints, '
                            f'got {out_indices!r}')
        for index in out_indices:
            if not isinstance(index, int) or not -num_stages <= index < num_stages:
                raise ValueError(f'out_indices entry {index!r} is out of range for '
                                 f'{num_stages} stages (valid: {-num_stages}..{num_stages - 1})')
        return tuple(sorted({index % num_stages for index in out_indices}))

    @abstractmethod
    def stem_modules(self) -> List[nn.Module]:
        """The modules before the first stage's blocks, frozen by ``frozen_stages >= 0``."""

    @abstractmethod
    def stage_modules(self, index: int) -> List[nn.Module]:
        """The modules of stage ``index``, frozen by ``frozen_stages > index``."""

    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        stages = [module for i in range(self.frozen_stages) for module in self.stage_modules(i)]
        for module in self.stem_modules() + stages:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> 'SparseViTBackbone':
        """Set the mode; frozen stages, and under ``norm_eval`` the BatchNorms, stay in eval."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                # Eval mode changes only what a norm does with running statistics.
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def init_default_weights(self) -> None:
        """The authors' initialisation: truncated-normal (std 0.02) linears with zero bias
        and unit LayerNorms, as both the VVT and LIT code bases do; subclasses add theirs."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_init(module, std=.02, bias=0.)
            elif isinstance(module, nn.LayerNorm):
                constant_init(module, val=1., bias=0.)

    def init_weights(self) -> None:
        """The authors' initialisation, then ``init_cfg``, then a ``Pretrained`` checkpoint."""
        if self.is_init:
            super().init_weights()  # mmengine warns about the repeated call and does nothing
            return
        init_cfg = self.init_cfg
        cfgs = [init_cfg] if isinstance(init_cfg, Mapping) else list(init_cfg or [])
        self.init_default_weights()
        # mmengine's Pretrained initialiser would load the checkpoint unconverted and
        # unchecked. It gets the other entries: it applies them, initialises the children that
        # have their own init_weights and keeps its bookkeeping; the checkpoint comes last, as
        # mmengine orders Pretrained too.
        self.init_cfg = [cfg for cfg in cfgs if cfg.get('type') != 'Pretrained'] or None
        try:
            super().init_weights()
        finally:
            self.init_cfg = init_cfg
        for cfg in cfgs:
            if cfg.get('type') == 'Pretrained':
                self.load_pretrained(cfg['checkpoint'], prefix=cfg.get('prefix'))

    @abstractmethod
    def convert_state_dict(self, checkpoint: Mapping) -> ConvertedCheckpoint:
        """A loaded checkpoint in any layout the backbone's converter knows -> (state dict in
        this model's layout and sizes, notes: key -> what happened to it). Changes neither.

        Raises:
            ValueError: Not a checkpoint of this architecture (the keys are named).
        """

    def check_state_dict(self,
                         state_dict: Mapping[str, Tensor],
                         source: str = 'the checkpoint') -> List[str]:
        """Raise a ValueError naming the missing and unexpected keys and the mismatched shapes
        unless ``state_dict`` fits this model; return the missing keys ``optional_keys`` allows.

        Args:
            state_dict (Mapping[str, Tensor]): A state dict in this model's layout.
            source (str): What to call it in the message. Defaults to 'the checkpoint'.
        """
        match = match_state_dict(self.state_dict(), state_dict)
        optional = [key for key in match.missing
                    if any(re.fullmatch(pattern, key) for pattern in self.optional_keys)]
        match = match._replace(missing=[key for key in match.missing if key not in optional])
        if not match.exact:
            raise ValueError(f'{source} does not match {type(self).__name__}'
                             f'(arch={self.arch_settings}): {match.describe()}')
        return optional

    def load_pretrained(self, filename: str, prefix: Optional[str] = None) -> None:
        """Load a checkpoint in any layout :meth:`convert_state_dict` knows.

        Args:
            filename (str): Path, URL or any scheme of mmengine's ``CheckpointLoader``.
            prefix (str, optional): Keep only the keys under it (e.g. ``'backbone.'``), with
                the prefix removed. Defaults to None.

        Raises:
            ValueError: No key under ``prefix``, a checkpoint of another architecture, or one
                that does not fit this model (the offending keys are named).
        """
        logger = MMLogger.get_current_instance()
        checkpoint = CheckpointLoader.load_checkpoint(filename, map_location='cpu', logger=logger)
        state_dict = unwrap_state_dict(checkpoint)
        if prefix:
            state_dict = strip_prefix(state_dict, prefix)
            if not state_dict:
                raise ValueError(f'{filename}: no key starts with prefix {prefix!r}')
        try:
            state_dict, notes = self.convert_state_dict(state_dict)
        except ValueError as error:
            raise ValueError(f'{filename}: {error}') from error
        newly_initialised = self.check_state_dict(state_dict, source=filename)
        # Checked above: only the optional keys may be missing.
        self.load_state_dict(state_dict, strict=False)
        name = type(self).__name__
        logger.info(f'{name}: loaded {len(state_dict)} tensors from {filename}')
        if notes:
            logger.info(f'{name}: ' + '; '.join(f'{key}: {note}' for key, note in notes.items()))
        if newly_initialised:
            logger.info(f'{name}: not in the checkpoint, newly initialised: ' +
                        ', '.join(newly_initialised))
