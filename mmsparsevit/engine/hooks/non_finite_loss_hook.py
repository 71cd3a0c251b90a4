"""Stop (or skip the step) when the training loss or its gradients are NaN or infinite."""
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.dist import all_reduce, get_dist_info
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


# What each rank contributes to the shared verdict.
_FINITE, _INFINITE, _NAN = 0, 1, 2


def _verdict(values: torch.Tensor) -> int:
    if bool(values.isnan().any()):
        return _NAN
    return _FINITE if bool(values.isfinite().all()) else _INFINITE


def _verdicts_of_all_ranks(verdict: int, reference: torch.Tensor) -> List[int]:
    """Every rank's verdict, on every rank: one all-reduce of ``world_size`` integers.

    Each rank fills its own slot of a zero vector, so the sum holds every rank's verdict and
    all ranks take the same decision in the same step (none enters DDP's gradient all-reduce
    or the optimizer step alone). Without a process group it is this process's verdict.
    """
    rank, world_size = get_dist_info()
    verdicts = torch.zeros(world_size, dtype=torch.int32, device=reference.device)
    verdicts[rank] = verdict
    all_reduce(verdicts, op='sum')
    return verdicts.tolist()


def _failure(verdicts: List[int]) -> Optional[Tuple[str, List[int]]]:
    """``(kind, ranks)`` of a step that some rank found non-finite, else None."""
    ranks = [rank for rank, verdict in enumerate(verdicts) if verdict != _FINITE]
    if not ranks:
        return None
    return ('NaN' if _NAN in verdicts else 'infinite'), ranks


@HOOKS.register_module()
class NonFiniteLossHook(Hook):
    """Guard the parameter update against a NaN or infinite loss or gradient.

    Before the optimizer wrapper back-propagates a loss, the loss is checked; before it
    steps, the gradients are (a finite loss can still have non-finite gradients, e.g. a
    square root or a normalisation at zero). A bad step never reaches the optimizer, so the
    weights, the optimizer state and the next checkpoint stay those of the last good step.

    Under distributed training each check is collective: every rank learns every rank's
    verdict in the same step, before any of them back-propagates (and so enters DDP's
    gradient all-reduce) or steps the optimizer, and all of them stop, or all skip, together,
    with a message naming the iteration and the rank(s) at fault. No rank waits in an
    all-reduce the others never join, and the replicas' weights stay equal. The cost is one
    all-reduce of ``world_size`` integers before each backward and one before each optimizer
    step, and only when a process group is running. Then:

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
        # (kind, ranks) of the failed check, and for gradients the parameters at fault here.
        self._bad_loss: Optional[Tuple[str, List[int]]] = None
        self._bad_gradients: Optional[Tuple[Tuple[str, List[int]], List[str]]] = None
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
                failure = _failure(_verdicts_of_all_ranks(_verdict(loss.detach()), loss))
                if failure is not None:
                    self._bad_loss = failure
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
                bad = [p for p, ok in zip(parameters, finite.tolist()) if not ok]
                verdict = max((_verdict(p.grad) for p in bad), default=_FINITE)
                failure = _failure(_verdicts_of_all_ranks(verdict, finite))
                if failure is not None:
                    self._bad_gradients = failure, [
                        self._parameter_names.get(id(p), '<unnamed>') for p in bad
                    ]
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
            kind, ranks = self._bad_loss
            message = self._describe(runner, f'the training loss is {kind}', outputs,
                                     data_batch, ranks)
        else:
            (kind, ranks), names = self._bad_gradients
            message = self._describe(runner, f'the gradients are {kind} although the loss is '
                                     'finite', outputs, data_batch, ranks)
            shown = ', '.join(names[:_MAX_QUOTED_PARAMETERS])
            more = len(names) - _MAX_QUOTED_PARAMETERS
            if names:
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
    def _describe(runner,
                  problem: str,
                  outputs: Optional[Dict[str, Any]],
                  data_batch: Any,
                  ranks: Sequence[int] = ()) -> str:
        """The message; under DDP it names the ranks at fault, and the loss terms and images
        quoted are those of the rank that writes it (each rank logs its own)."""
        terms = ', '.join(f'{name}={float(value):.4g}' for name, value in (outputs or {}).items()
                          if _is_number(value))
        images = _batch_images(data_batch)
        where = f' (batch images: {", ".join(images)})' if images else ''
        rank, world_size = get_dist_info()
        on_ranks, terms_intro = '', ': '
        if world_size > 1:
            on_ranks = (f' on rank{"s" if len(ranks) > 1 else ""} '
                        f'{", ".join(map(str, ranks))} of {world_size}')
            terms_intro = f'; rank {rank} had '
        return (f'{problem}{on_ranks} at iteration {runner.iter + 1} (epoch '
                f'{runner.epoch + 1}){terms_intro + terms if terms else ""}{where}')


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
