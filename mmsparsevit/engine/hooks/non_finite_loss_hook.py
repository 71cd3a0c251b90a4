"""Stop (or skip the step) when the training loss or its gradients are NaN or infinite."""
import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.dist import all_reduce
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.optim import AmpOptimWrapper, OptimWrapper, OptimWrapperDict

from ...registry import HOOKS

__all__ = ['NonFiniteLossError', 'NonFiniteLossHook']

_ACTIONS = ('stop', 'skip')
# Batch image paths / parameter names quoted in a message.
_MAX_QUOTED_IMAGES = 8
_MAX_QUOTED_PARAMETERS = 5


class NonFiniteLossError(FloatingPointError):
    """The training loss, or its gradients, became NaN or infinite."""


def _all_ranks_agree(flag: bool, reference: torch.Tensor) -> bool:
    """True on every rank when ``flag`` is true on any rank, so all ranks skip together."""
    total = torch.tensor(float(flag), device=reference.device)
    all_reduce(total, op='sum')
    return bool(total.item() > 0)


@HOOKS.register_module()
class NonFiniteLossHook(Hook):
    """Guard the parameter update against a NaN or infinite loss or gradient.

    Before the optimizer wrapper back-propagates a loss, the loss is checked; before it
    steps, the gradients are (a finite loss can still have non-finite gradients, e.g. a
    square root or a normalisation at zero). Each verdict is shared across ranks. A bad step
    never reaches the optimizer, so the weights, the optimizer state and the next checkpoint
    stay those of the last good step. Then:

    - ``action='stop'`` ends training with :class:`NonFiniteLossError`, whose message names
      the iteration, every loss term, the batch's image files and, for gradients, the
      parameters whose gradients are not finite;
    - ``action='skip'`` logs the same as a warning and goes on with the next batch, unless
      more than ``max_consecutive_skips`` steps in a row were skipped, which stops training.

    Gradients are not checked under :class:`~mmengine.optim.AmpOptimWrapper`: its gradient
    scaler skips steps with infinite gradients by design (and lowers the scale).

    Enabled by ``tools/train.py`` for every run (see
    :func:`mmsparsevit.runtime.harden_train_config`).

    Why a hook that wraps the optimizer wrapper's ``update_params`` and ``step``, not an
    ``OptimWrapper`` subclass chosen by ``optim_wrapper.type``: the type is the config's
    choice (``--amp`` sets it to ``AmpOptimWrapper``, a config may name its own wrapper, and
    ``OptimWrapperDict`` holds several), and one subclass guards only its own type, so the
    tools would have to overwrite the type and drop whatever the config chose. Wrapping the
    built wrappers guards each of them, whichever class it is. The message also needs what
    only a hook sees: the iteration and epoch, every loss term, the batch's image files and the
    model's parameter names.

    Args:
        action (str): ``'stop'`` or ``'skip'``. Defaults to ``'stop'``.
        max_consecutive_skips (int): With ``'skip'``, how many steps in a row may be skipped
            before training stops. Defaults to 10.
        check_gradients (bool): Also check the gradients before each optimizer step.
            Defaults to True.
    """

    priority = 'ABOVE_NORMAL'  # before the checkpoint and logger hooks of the same iteration

    def __init__(self,
                 action: str = 'stop',
                 max_consecutive_skips: int = 10,
                 check_gradients: bool = True) -> None:
        if action not in _ACTIONS:
            raise ValueError(f'NonFiniteLossHook: action must be one of {_ACTIONS}, '
                             f'got {action!r}')
        if max_consecutive_skips < 0:
            raise ValueError('NonFiniteLossHook: max_consecutive_skips must be >= 0, got '
                             f'{max_consecutive_skips}')
        self.action = action
        self.max_consecutive_skips = max_consecutive_skips
        self.check_gradients = check_gradients
        self.skipped_steps = 0
        self._consecutive_skips = 0
        self._bad_loss: Optional[float] = None
        self._bad_gradients: Optional[Tuple[str, List[str]]] = None
        self._parameter_names: Dict[int, str] = {}

    def before_train(self, runner) -> None:
        model = getattr(runner.model, 'module', runner.model)
        self._parameter_names = {
            id(parameter): name
            for name, parameter in model.named_parameters()
        }
        wrappers = runner.optim_wrapper
        wrappers = (wrappers.values() if isinstance(wrappers, OptimWrapperDict) else [wrappers])
        for wrapper in wrappers:
            if isinstance(wrapper, OptimWrapper):
                self._guard(wrapper)
                if self.check_gradients and not isinstance(wrapper, AmpOptimWrapper):
                    self._guard_step(wrapper)

    @staticmethod
    def _route_through(wrapper: OptimWrapper, method: str, make_guarded) -> None:
        """Replace ``wrapper.<method>`` by ``make_guarded(original)``, wrapping the original
        method once however often training is resumed."""
        saved = f'_{method}_unguarded'
        original = getattr(wrapper, saved, getattr(wrapper, method))
        setattr(wrapper, saved, original)
        setattr(wrapper, method, make_guarded(original))

    def _guard(self, wrapper: OptimWrapper) -> None:
        """Check the loss before ``wrapper.update_params`` back-propagates it."""

        def make_guarded(update_params):

            def guarded_update_params(loss: torch.Tensor, *args, **kwargs) -> None:
                finite = bool(torch.isfinite(loss.detach()).all())
                if _all_ranks_agree(not finite, loss):
                    self._bad_loss = float(loss.detach().float().sum())
                    return
                update_params(loss, *args, **kwargs)

            return guarded_update_params

        self._route_through(wrapper, 'update_params', make_guarded)

    def _guard_step(self, wrapper: OptimWrapper) -> None:
        """Check the gradients before ``wrapper.step`` applies them."""

        def make_guarded(step):

            def guarded_step(**kwargs) -> None:
                parameters = [
                    parameter for group in wrapper.optimizer.param_groups
                    for parameter in group['params'] if parameter.grad is not None
                ]
                if not parameters:
                    step(**kwargs)
                    return
                finite = torch.stack(
                    [parameter.grad.isfinite().all() for parameter in parameters])
                if _all_ranks_agree(not bool(finite.all()), finite):
                    bad = [p for p, ok in zip(parameters, finite.tolist()) if not ok]
                    kind = 'NaN' if any(p.grad.isnan().any() for p in bad) else 'infinite'
                    self._bad_gradients = (kind, [
                        self._parameter_names.get(id(p), '<unnamed>') for p in bad
                    ])
                    return
                step(**kwargs)

            return guarded_step

        self._route_through(wrapper, 'step', make_guarded)

    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch: Any = None,
                         outputs: Optional[Dict[str, Any]] = None) -> None:
        if self._bad_loss is None and self._bad_gradients is None:
            self._consecutive_skips = 0
            return
        if self._bad_loss is not None:
            kind = 'NaN' if math.isnan(self._bad_loss) else 'infinite'
            message = self._describe(runner, f'the training loss is {kind}', outputs,
                                     data_batch)
        else:
            kind, names = self._bad_gradients
            message = self._describe(runner, f'the gradients are {kind} although the loss is '
                                     'finite', outputs, data_batch)
            shown = ', '.join(names[:_MAX_QUOTED_PARAMETERS])
            more = len(names) - _MAX_QUOTED_PARAMETERS
            message += (f'; non-finite gradients in {len(names)} parameter(s): {shown}'
                        f'{f" and {more} more" if more > 0 else ""}')
        self._bad_loss = self._bad_gradients = None
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
                f'a non-finite loss or gradients (max_consecutive_skips='
                f'{self.max_consecutive_skips}).')
        print_log(f'{message}; skipped this step ({self.skipped_steps} skipped so far).',
                  logger='current', level=logging.WARNING)

    @staticmethod
    def _describe(runner, problem: str, outputs: Optional[Dict[str, Any]],
                  data_batch: Any) -> str:
        terms = ', '.join(f'{name}={float(value):.4g}' for name, value in (outputs or {}).items()
                          if _is_number(value))
        images = _batch_images(data_batch)
        where = f' (batch images: {", ".join(images)})' if images else ''
        return (f'{problem} at iteration {runner.iter + 1} (epoch '
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
