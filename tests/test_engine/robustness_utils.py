# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Shared by the robustness tests: the tools tests' fixture helpers and a checkpoint payload."""
from pathlib import Path

import tool_test_utils as tool_utils
import torch
from mmengine.model import BaseModel
from mmengine.runner import Runner

REPO_ROOT = tool_utils.REPO_ROOT
DET_CONFIG = tool_utils.DET_CONFIG
SEG_CONFIG = tool_utils.SEG_CONFIG
data_options = tool_utils.data_options
fixture_config = tool_utils.fixture_config
load_tool = tool_utils.load_tool
make_fixture_data = tool_utils.make_fixture_data
run_tool = tool_utils.run_tool


class WritesFile:
    """Unpickling this object creates a file: the stand-in for an arbitrary code payload."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f'open({self.path!r}, "w").write("payload ran")', ))


class ToyRegressor(BaseModel):
    """Fits one weight vector; the loss is NaN/Inf exactly when the input is."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2))

    def forward(self, inputs, data_samples=None, mode='tensor'):
        return dict(loss=((inputs - self.weight)**2).sum())


class DistanceRegressor(ToyRegressor):
    """Loss = distance to the sample: finite everywhere, gradient 0/0 = NaN at the sample."""

    def forward(self, inputs, data_samples=None, mode='tensor'):
        return dict(loss=((inputs - self.weight)**2).sum().sqrt())


def toy_runner(work_dir: Path, samples, max_iters: int, custom_hooks=(), default_hooks=None,
               model=None, **kwargs) -> Runner:
    """A one-sample-per-iteration runner over ``samples`` (each a 2-vector), in order; the
    model is a fresh :class:`ToyRegressor` unless given."""
    return Runner(
        model=model or ToyRegressor(),
        work_dir=str(work_dir),
        train_dataloader=dict(
            dataset=[dict(inputs=torch.as_tensor(sample, dtype=torch.float32))
                     for sample in samples],
            sampler=dict(type='DefaultSampler', shuffle=False),
            collate_fn=dict(type='default_collate'),
            batch_size=1,
            num_workers=0),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=default_hooks,
        custom_hooks=list(custom_hooks),
        experiment_name=f'toy_{work_dir.name}',
        **kwargs)


def capture_warnings(monkeypatch, module) -> list:
    """Collect what ``module`` logs through ``print_log`` (MMLogger bypasses pytest's capture)."""
    messages = []
    monkeypatch.setattr(module, 'print_log', lambda msg, *args, **kwargs: messages.append(msg))
    return messages
