"""Stop (or skip the step) when the training loss is NaN or infinite."""
import logging
import math
from typing import Any, Dict, List, Optional, Sequence

import torch
from mmengine.dist import all_reduce
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.optim import OptimWrapper, OptimWrapperDict

from ...registry import HOOKS

__all__ = ['NonFiniteLossError', 'NonFiniteLossHook']

_ACTIONS = ('stop', 'skip')
# Batch image paths quoted in a message.
_MAX_QUOTED_IMAGES = 8


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def _all_ranks_agree(flag: bool, reference: torch.Tensor) -> bool:
    """True on every rank when ``flag`` is true on any rank, so all ranks skip together."""
    total = torch.tensor(float(flag), device=reference.device)
    all_reduce(total, op='sum')
    return bool(total.item() > 0)


@HOOKS.register_module()
class NonFiniteLossHook(Hook):
    """Guard the parameter update against a NaN or infinite loss.

    Before the optimizer wrapper back-propagates a loss, the loss is checked (and the verdict
    shared across ranks). A non-finite loss is never back-propagated, so the weights, the
    optimizer state and the next checkpoint stay those of the last good step. Then:

    - ``action='stop'`` ends training with :class:`NonFiniteLossError`, whose message names
      the iteration, every loss term and the batch's image files;
    - ``action='skip'`` logs the same as a warning and goes on with the next batch, unless
      more than ``max_consecutive_skips`` steps in a row were skipped, which stops training.

    Enabled by ``tools/train.py`` for every run (see
    :func:`mmsparsevit.engine.harden_train_config`).

    Args:
        action (str): ``'stop'`` or ``'skip'``. Defaults to ``'stop'``.
        max_consecutive_skips (int): With ``'skip'``, how many steps in a row may be skipped
            before training stops. Defaults to 10.
    """

    priority = 'ABOVE_NORMAL'  # before the checkpoint and logger hooks of the same iteration

    def __init__(self, action: str = 'stop', max_consecutive_skips: int = 10) -> None:
        if action not in _ACTIONS:
            raise ValueError(f'NonFiniteLossHook: action must be one of {_ACTIONS}, '
                             f'got {action!r}')
        if max_consecutive_skips < 0:
            raise ValueError('NonFiniteLossHook: max_consecutive_skips must be >= 0, got '
                             f'{max_consecutive_skips}')
        self.action = action
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps = 0
        self._consecutive_skips = 0
        self._bad_loss: Optional[float] = None

    def before_train(self, runner) -> None:
        wrappers = runner.optim_wrapper
        wrappers = (wrappers.values() if isinstance(wrappers, OptimWrapperDict) else [wrappers])
        for wrapper in wrappers:
            if isinstance(wrapper, OptimWrapper):
                self._guard(wrapper)

    def _guard(self, wrapper: OptimWrapper) -> None:
        """Route ``wrapper.update_params`` through the check (once, however often resumed)."""
        update_params = getattr(wrapper, '_update_params_unguarded', wrapper.update_params)
        wrapper._update_params_unguarded = update_params

        def guarded_update_params(loss: torch.Tensor, *args, **kwargs) -> None:
            finite = bool(torch.isfinite(loss.detach()).all())
            if _all_ranks_agree(not finite, loss):
                self._bad_loss = float(loss.detach().float().sum())
                return
            update_params(loss, *args, **kwargs)

        wrapper.update_params = guarded_update_params

    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch: Any = None,
                         outputs: Optional[Dict[str, Any]] = None) -> None:
        if self._bad_loss is None:
            self._consecutive_skips = 0
            return
        bad_loss, self._bad_loss = self._bad_loss, None
        message = self._describe(runner, bad_loss, outputs, data_batch)
        self.skipped_steps += 1
        self._consecutive_skips += 1
        if self.action == 'stop':
            raise NonFiniteLossError(
                f'{message}. Training stopped before this step changed the weights. Lower the '
                'learning rate, enable gradient clipping (optim_wrapper.clip_grad) or check '
                "these images; custom_hooks=[dict(type='mmsparsevit.NonFiniteLossHook', "
                "action='skip')] skips such steps instead.")
        if self._consecutive_skips > self.max_consecutive_skips:
            raise NonFiniteLossError(
                f'{message}. Training stopped: {self._consecutive_skips} consecutive steps had '
                f'a non-finite loss (max_consecutive_skips={self.max_consecutive_skips}).')
        print_log(f'{message}; skipped this step ({self.skipped_steps} skipped so far).',
                  logger='current', level=logging.WARNING)

    @staticmethod
    def _describe(runner, bad_loss: float, outputs: Optional[Dict[str, Any]],
                  data_batch: Any) -> str:
        kind = 'NaN' if math.isnan(bad_loss) else 'infinite'
        terms = ', '.join(f'{name}={float(value):.4g}' for name, value in (outputs or {}).items()
                          if _is_number(value))
        images = _batch_images(data_batch)
        where = f' (batch images: {", ".join(images)})' if images else ''
        return (f'the training loss is {kind} at iteration {runner.iter + 1} (epoch '
                f'{runner.epoch + 1}){": " + terms if terms else ""}{where}')


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, torch.Tensor)
                                               and value.numel() == 1)


def _batch_images(data_batch: Any) -> List[str]:
    if not isinstance(data_batch, dict):
        return []
    samples: Sequence = data_batch.get('data_samples') or ()
    paths = [
        str(sample.metainfo['img_path']) for sample in samples
        if hasattr(sample, 'metainfo') and sample.metainfo.get('img_path')
    ]
    if len(paths) > _MAX_QUOTED_IMAGES:
        paths = paths[:_MAX_QUOTED_IMAGES] + [f'... {len(paths) - _MAX_QUOTED_IMAGES} more']
    return paths
