# Copyright (c) mmsparsevit contributors. All rights reserved.
"""The random generator states a checkpoint keeps pass the safe loader and, restored, make
Python, numpy and torch draw the numbers they drew after the capture."""
import random

import numpy as np
import torch

from mmsparsevit.engine.hooks.random_state_hook import (capture_random_states,
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
