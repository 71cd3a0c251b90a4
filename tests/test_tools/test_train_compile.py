# Copyright (c) mmsparsevit contributors. All rights reserved.
"""tools/train.py honours mmengine's ``compile`` config key: the training step is compiled."""
import pytest
import torch._dynamo as dynamo
from tool_test_utils import SEG_CONFIG, data_options, load_tool, make_fixture_data
from torch._dynamo.utils import counters

from mmsparsevit.runtime import harden_train_config
from mmsparsevit.runtime.cli import build_runner

pytestmark = pytest.mark.slow


def _runner(tmp_path, *options):
    train = load_tool('train.py')
    data_root = make_fixture_data(tmp_path / 'data', num_train=2, num_val=1)
    args = train.parse_args([
        str(SEG_CONFIG), '--work-dir', str(tmp_path / 'work'), '--cfg-options',
        *data_options(SEG_CONFIG, data_root), 'train_cfg.max_iters=1',
        'train_cfg.val_interval=10', *options
    ])
    return build_runner(train.train_config(args), 'train', harden_train_config)


def test_compile_true_reaches_the_runner(tmp_path):
    runner = _runner(tmp_path, 'compile=True')
    assert runner.cfg.compile is True


def test_training_with_compile_runs_a_compiled_train_step(tmp_path):
    # mmengine passes a dict as torch.compile's keyword arguments; dynamo's 'eager' backend
    # captures the same graphs as the default (inductor) without generating code, which on
    # the CPU would take minutes for a segmentor's training step.
    runner = _runner(tmp_path, 'compile.backend=eager')
    dynamo.reset()
    counters.clear()
    runner.train()
    # torch.compile wraps the step it compiles and keeps the original.
    assert hasattr(runner.model.train_step, '_torchdynamo_orig_callable')
    assert counters['stats']['unique_graphs'] > 0
    assert runner.iter == 1
