"""Keep the random number generators' states in every checkpoint, so that resuming continues
the run that was interrupted."""
import logging
import random
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from mmengine.dist import all_gather_object, get_dist_info
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log
from mmengine.runner import IterBasedTrainLoop

from ...registry import HOOKS

__all__ = ['RandomStateHook', 'capture_random_states', 'restore_random_states']

# Where the states live in a checkpoint: ``meta[RANDOM_STATES_KEY][rank]``.
RANDOM_STATES_KEY = 'random_states'


def capture_random_states() -> Dict[str, Any]:
    """This process's Python, numpy, torch (and CUDA) generator states, as tensors, ints,
    strings and tuples only: what the safe checkpoint loader admits."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = dict(
        python=random.getstate(),
        numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)),
                   position=int(position), has_gauss=int(has_gauss),
                   cached_gaussian=float(cached_gaussian)),
        torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states['cuda'] = torch.cuda.get_rng_state()
    return states


def restore_random_states(states: Dict[str, Any]) -> None:
    """Set this process's generators to ``states`` from :func:`capture_random_states`."""
    random.setstate(states['python'])
    saved = states['numpy']
    np.random.set_state((saved['kind'], saved['keys'].numpy().astype(np.uint32),
                         saved['position'], saved['has_gauss'], saved['cached_gaussian']))
    torch.set_rng_state(states['torch'])
    if 'cuda' in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states['cuda'])


def _checkpoint_hooks(runner) -> List[CheckpointHook]:
    return [hook for hook in runner.hooks if isinstance(hook, CheckpointHook)]


class _RestoreAfterReplay:
    """Stands in for ``IterBasedTrainLoop.dataloader_iterator`` after a resume: passes the
    ``replayed`` batches mmengine draws to skip the trained data through, then restores the
    generator states before the first new batch is drawn, and puts the loop's iterator back.
    """

    def __init__(self, loop: IterBasedTrainLoop, replayed: int, states: Dict[str, Any]) -> None:
        self._loop = loop
        self._iterator = loop.dataloader_iterator
        self._replayed = replayed
        self._states = states

    def __iter__(self):
        return self

    def __next__(self):
        if self._replayed > 0:
            self._replayed -= 1
            return next(self._iterator)
        restore_random_states(self._states)
        self._loop.dataloader_iterator = self._iterator
        return next(self._iterator)


@HOOKS.register_module()
class RandomStateHook(Hook):
    """Save every rank's random generator states in each checkpoint; restore them on resume.

    mmengine 0.10.7 resumes the weights, the optimizer, the schedulers, the iteration and the
    seed, and re-draws the trained batches to put the sampler (and the data workers, which it
    seeds from the seed, the rank and the worker id) where they were. The main process's
    generators, which drop path, dropout and any augmentation run outside the workers draw
    from, start afresh. With this hook they continue where the checkpoint left them, so a
    resumed run draws the numbers the uninterrupted run would have drawn.

    - Saving: ``meta['random_states']`` holds one entry per rank, each with the Python,
      numpy, torch and (when CUDA is in use) CUDA generator states, stored as tensors, ints
      and tuples. Rank 0 alone writes checkpoints, so under distributed training the ranks
      share their states (one ``all_gather_object`` of a few kilobytes per rank) right
      before each save that every rank can foresee: after the iterations and epochs at which
      a ``CheckpointHook`` saves, and before each validation (which may save the best
      checkpoint). A checkpoint saved at any other moment (by another hook) holds no states
      rather than stale ones, and resuming from it warns.
    - Restoring: only when resuming (the run starts past iteration 0), on each rank its own
      entry, right before the first batch that was not trained yet is drawn: under
      :class:`~mmengine.runner.IterBasedTrainLoop` after mmengine's replay of the trained
      batches, which itself draws numbers when augmentations run in the main process
      (``num_workers=0``); under ``EpochBasedTrainLoop`` before the first resumed epoch (that
      loop restarts an epoch that was interrupted, so only checkpoints at epoch ends continue
      the same run).
    - Validation leaves the training generators as it found them (their states are saved
      before it and restored after it): otherwise a validation right after a checkpoint, which
      the resumed run does not repeat, would shift every later draw.

    The guarantee needs a fixed seed (``randomness=dict(seed=...)``): mmengine builds the
    training data loader, and seeds its workers, before it reads the seed from the
    checkpoint. A checkpoint without states (written without this hook), or written by a
    different number of ranks, resumes with fresh generators and a warning.

    Enabled by ``tools/train.py`` for every run (see
    :func:`mmsparsevit.runtime.harden_train_config`).
    """

    priority = 'LOW'  # after the other hooks of an iteration, before the checkpoint hook

    def __init__(self) -> None:
        # Every rank's states, and the runner iteration at which they were gathered.
        self._all_ranks_states: Optional[List[Dict[str, Any]]] = None
        self._gathered_at: Optional[int] = None
        self._states_before_val: Optional[Dict[str, Any]] = None
        self._loaded_states: Optional[Dict[str, Any]] = None
        self._unusable_checkpoint: Optional[str] = None  # why the loaded one holds none

    def _gather(self, runner) -> None:
        self._all_ranks_states = all_gather_object(capture_random_states())
        self._gathered_at = runner.iter

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None,
                         outputs: Optional[dict] = None) -> None:
        if get_dist_info()[1] > 1 and any(
                not hook.by_epoch and (hook.every_n_train_iters(runner, hook.interval,
                                                                hook.save_begin)
                                       or (hook.save_last and hook.is_last_train_iter(runner)))
                for hook in _checkpoint_hooks(runner)):
            self._gather(runner)

    def after_train_epoch(self, runner) -> None:
        if get_dist_info()[1] > 1 and any(
                hook.by_epoch and (hook.every_n_epochs(runner, hook.interval, hook.save_begin)
                                   or (hook.save_last and hook.is_last_train_epoch(runner)))
                for hook in _checkpoint_hooks(runner)):
            self._gather(runner)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if get_dist_info()[1] > 1:
            states = self._all_ranks_states if self._gathered_at == runner.iter else None
            if states is None:
                print_log('RandomStateHook: this checkpoint is saved at a moment the ranks did '
                          'not foresee, so it holds no random generator states; resuming from '
                          'it draws other numbers than the interrupted run would have.',
                          logger='current', level=logging.WARNING)
        else:
            # A checkpoint saved during validation (the best one) keeps the training states.
            states = [self._states_before_val or capture_random_states()]
        if states is not None:
            checkpoint.setdefault('meta', {})[RANDOM_STATES_KEY] = states

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        saved = (checkpoint.get('meta') or {}).get(RANDOM_STATES_KEY)
        rank, world_size = get_dist_info()
        self._loaded_states, self._unusable_checkpoint = None, None
        if saved is None:
            self._unusable_checkpoint = 'it holds no random generator states'
        elif len(saved) != world_size:
            self._unusable_checkpoint = (f'it was written by {len(saved)} rank(s), this run '
                                         f'has {world_size}')
        else:
            self._loaded_states = saved[rank]

    def before_train(self, runner) -> None:
        if runner.iter == 0:  # not resumed: a checkpoint given as load_from keeps no states
            self._loaded_states = None
            return
        if self._unusable_checkpoint is not None:
            print_log('RandomStateHook: the checkpoint resumed from cannot restore the random '
                      f'generators ({self._unusable_checkpoint}); drop path, dropout and '
                      'augmentations will draw other numbers than the interrupted run would '
                      'have.', logger='current', level=logging.WARNING)
        loop = runner.train_loop
        if self._loaded_states is not None and isinstance(loop, IterBasedTrainLoop):
            loop.dataloader_iterator = _RestoreAfterReplay(loop, runner.iter,
                                                           self._loaded_states)
            self._loaded_states = None

    def before_train_epoch(self, runner) -> None:
        if self._loaded_states is not None:
            restore_random_states(self._loaded_states)
            self._loaded_states = None

    def before_val(self, runner) -> None:
        self._states_before_val = capture_random_states()
        if get_dist_info()[1] > 1:
            self._gather(runner)

    def after_val(self, runner) -> None:
        if self._states_before_val is not None:
            restore_random_states(self._states_before_val)
            self._states_before_val = None
