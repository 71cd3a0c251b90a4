"""How well a loaded checkpoint fits the model it is loaded into, said before it is used.

mmengine loads ``load_from`` and ``tools/test.py``'s checkpoint with ``strict=False`` and
reports unmatched keys in a warning deep in the log: a checkpoint of another model is
evaluated as random weights with exit code 0. Here the checkpoint is first converted to the
model's layout (the authors' mmdet 2.x / mmseg 0.x whole-model releases,
:func:`~mmsparsevit.models.convert_dense_checkpoint`), then compared key for key and shape for
shape; weights that would stay unloaded stop the run unless a partial load is asked for.
"""
import logging
from typing import Any, MutableMapping

import torch.nn as nn
from mmengine.logging import print_log

from mmsparsevit.models import convert_dense_checkpoint
from mmsparsevit.utils import StateDictMatch, match_state_dict, unwrap_state_dict

__all__ = ['WeightsMismatchError', 'match_checkpoint_to_model']


class WeightsMismatchError(RuntimeError):
    """Model weights would stay unloaded (missing from the checkpoint or of another shape)."""


def match_checkpoint_to_model(model: nn.Module,
                              checkpoint: MutableMapping[str, Any],
                              source: str = 'the checkpoint',
                              allow_partial: bool = False) -> StateDictMatch:
    """Convert ``checkpoint``'s weights to ``model``'s layout in place and check the fit.

    Afterwards ``checkpoint['state_dict']`` holds the converted weights, which is where
    mmengine's loaders read them.

    Args:
        model (nn.Module): The detector or segmentor (unwrapped).
        checkpoint (dict): A loaded checkpoint; changed in place.
        source (str): How messages name the checkpoint.
        allow_partial (bool): Warn, instead of raising, when model weights stay unloaded.

    Returns:
        StateDictMatch: The fit of the converted weights.

    Raises:
        WeightsMismatchError: The checkpoint's backbone cannot be converted to the model's
            (another architecture), or model weights find nothing in the checkpoint (their
            count and the first few are named) and ``allow_partial`` is False.
    """
    try:
        state_dict, notes = convert_dense_checkpoint(unwrap_state_dict(checkpoint), model)
    except ValueError as err:
        raise WeightsMismatchError(f'{source} does not fit the model: {err}') from None
    checkpoint['state_dict'] = state_dict
    if notes:
        print_log(f'{source}: converted to this model\'s layout: ' +
                  '; '.join(f'{key}: {note}' for key, note in notes.items()),
                  logger='current', level=logging.INFO)
    match = match_state_dict(model.state_dict(), state_dict)
    # BatchNorm's step counter is not a weight; files of old PyTorch versions lack it (mmengine
    # does not report it missing either).
    match = match._replace(missing=[key for key in match.missing
                                    if not key.endswith('.num_batches_tracked')])
    unloaded = len(match.missing) + len(match.mismatched)
    if unloaded and not allow_partial:
        raise WeightsMismatchError(
            f'{source} does not fit the model: {unloaded} of its {len(model.state_dict())} '
            f'weights would stay unloaded: {match.describe(limit=5)}. Check that the '
            'checkpoint belongs to this config; pass --allow-partial-checkpoint to run '
            'anyway.')
    if not match.exact:
        banner = '!' * 30
        print_log(f'{banner} {source} fits the model only partly: {match.describe(limit=5)} '
                  f'{banner}', logger='current', level=logging.WARNING)
    return match
