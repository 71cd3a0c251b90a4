# Copyright (c) mmsparsevit contributors. All rights reserved.
"""The random generator states a checkpoint keeps pass the safe loader and, restored, make
Python, numpy and torch draw the numbers they drew after the capture."""
import random
from types import SimpleNamespace

import numpy as np
import torch
from mmengine.hooks import CheckpointHook

from mmsparsevit.engine.hooks import random_state_hook
from mmsparsevit.engine.hooks.random_state_hook import (RANDOM_STATES_KEY, RandomStateHook,
                                                        capture_random_states,
                                                        restore_random_states)
from mmsparsevit.utils.checkpoint import load_from_local


def _draws():
    return random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3)


def test_states_survive_the_safe_loader_and_repeat_the_draws(tmp_path):
    np.random.randn()  # leaves a cached Gaussian in numpy's state, which must come back too
    path = tmp_path / 'states.pth'
    torch.save(dict(meta=dict(random_states=[capture_random_states()])), path)
    expected = _draws()
    _draws()  # move every generator on
    restore_random_states(load_from_local(str(path))['meta']['random_states'][0])
    python, numpy_uniform, numpy_gaussian, torch_uniform = _draws()
    assert (python, numpy_uniform, numpy_gaussian) == expected[:3]
    assert torch.equal(torch_uniform, expected[3])


def test_ranks_share_their_states_only_for_the_saves_they_foresee(monkeypatch):
    """Under DDP the states are gathered after the iterations at which the checkpoint hook
    saves (and before validation), not after every iteration; a save at another moment
    gets no states rather than stale ones."""
    runner = SimpleNamespace(iter=0, max_iters=6, hooks=[CheckpointHook(interval=3,
                                                                        by_epoch=False)])
    gathered_at = []

    def all_gather_object(states):
        gathered_at.append(runner.iter)
        return [states, states]

    monkeypatch.setattr(random_state_hook, 'get_dist_info', lambda: (0, 2))
    monkeypatch.setattr(random_state_hook, 'all_gather_object', all_gather_object)
    hook = RandomStateHook()
    for index in range(runner.max_iters):
        runner.iter = index
        hook.after_train_iter(runner, index)
    assert gathered_at == [2, 5]  # iteration 3 (every third) and 6 (the last)

    foreseen = {}
    hook.before_save_checkpoint(runner, foreseen)
    assert len(foreseen['meta'][RANDOM_STATES_KEY]) == 2

    runner.iter = 4
    unforeseen = {}
    hook.before_save_checkpoint(runner, unforeseen)
    assert RANDOM_STATES_KEY not in unforeseen.get('meta', {})

    hook.before_val(runner)
    assert gathered_at[-1] == 4
    before_val = {}
    hook.before_save_checkpoint(runner, before_val)  # the best checkpoint, saved in val
    assert len(before_val['meta'][RANDOM_STATES_KEY]) == 2
