"""State-dict helpers shared by the converters, the backbones and the tools.

Pure functions: nothing here reads a file or changes its input.
"""
from collections import OrderedDict
from typing import Dict, List, Mapping, NamedTuple

from torch import Tensor

__all__ = ['StateDictMatch', 'match_state_dict', 'strip_prefix', 'unwrap_state_dict']


def unwrap_state_dict(checkpoint: Mapping) -> 'OrderedDict[str, Tensor]':
    """The model's tensors of a loaded checkpoint.

    Takes the state dict from under ``state_dict`` (mmengine, mmcv) or ``model`` (the authors'
    training scripts, timm, DeiT) when present, else the mapping itself, and removes a
    ``module.`` prefix that (Distributed)DataParallel leaves on every key.

    Raises:
        TypeError: ``checkpoint`` is not a mapping.
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f'a checkpoint must be a dict, got {type(checkpoint).__name__}')
    state_dict = checkpoint
    for wrapper in ('state_dict', 'model'):
        if isinstance(checkpoint.get(wrapper), Mapping):
            state_dict = checkpoint[wrapper]
            break
    if state_dict and all(key.startswith('module.') for key in state_dict):
        return OrderedDict((key[len('module.'):], value) for key, value in state_dict.items())
    return OrderedDict(state_dict)


def strip_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> 'OrderedDict[str, Tensor]':
    """The entries under ``prefix`` (e.g. ``'backbone.'``), with the prefix removed."""
    return OrderedDict((key[len(prefix):], value) for key, value in state_dict.items()
                       if key.startswith(prefix))


class StateDictMatch(NamedTuple):
    """How a state dict fits a model: every offender, in the model's key order."""

    missing: List[str]
    unexpected: List[str]
    mismatched: List[str]  # 'key: checkpoint (shape) vs model (shape)'

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 8) -> str:
        """One line: the count of each kind of offender and the first ``limit`` of each."""
        parts = []
        for name, keys in (('missing', self.missing), ('unexpected', self.unexpected),
                           ('shape mismatches', self.mismatched)):
            if keys:
                shown = ', '.join(keys[:limit]) + (', ...' if len(keys) > limit else '')
                parts.append(f'{len(keys)} {name} ({shown})')
        return '; '.join(parts) if parts else 'every key matches'


def match_state_dict(expected: Mapping[str, Tensor],
                     state_dict: Mapping[str, Tensor]) -> StateDictMatch:
    """Compare ``state_dict`` with a model's ``expected`` state dict key by key and shape by
    shape (meta tensors are fine on either side)."""
    shapes: Dict[str, tuple] = {key: tuple(value.shape) for key, value in expected.items()}
    return StateDictMatch(
        missing=[key for key in shapes if key not in state_dict],
        unexpected=[key for key in state_dict if key not in shapes],
        mismatched=[
            f'{key}: checkpoint {tuple(value.shape)} vs model {shapes[key]}'
            for key, value in state_dict.items()
            if key in shapes and tuple(value.shape) != shapes[key]
        ])
