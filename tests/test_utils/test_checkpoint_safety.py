"""Checkpoints written by mmengine load under weights_only; anything else is refused."""
import os
import pickle
import zipfile

import pytest
import torch
import torch.nn as nn
from mmengine.model import BaseModel
from mmengine.runner import CheckpointLoader, Runner

import mmsparsevit  # noqa: F401  (installs the allow-list)
from mmsparsevit.utils import CorruptCheckpointError, UnsafeCheckpointError


class ToyRegressor(BaseModel):

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, inputs, targets, mode='tensor'):
        outputs = self.linear(inputs)
        if mode == 'loss':
            return dict(loss=((outputs - targets)**2).mean())
        return outputs


class ToyDataset(torch.utils.data.Dataset):

    def __len__(self):
        return 8

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        x = torch.randn(4, generator=generator)
        return dict(inputs=x, targets=x.sum(0, keepdim=True))


def _runner(work_dir, max_iters, resume=False, load_from=None):
    return Runner(
        model=ToyRegressor(),
        work_dir=str(work_dir),
        train_dataloader=dict(
            dataset=ToyDataset(),
            sampler=dict(type='DefaultSampler', shuffle=True),
            collate_fn=dict(type='default_collate'),
            batch_size=2,
            num_workers=0),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.01)),
        param_scheduler=dict(type='MultiStepLR', milestones=[2], by_epoch=False, end=100),
        train_cfg=dict(by_epoch=False, max_iters=max_iters, val_interval=100),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False)),
        resume=resume,
        load_from=load_from,
        randomness=dict(seed=0),
        experiment_name=f'toy_{max_iters}_{resume}')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('toy')
    runner = _runner(work_dir, max_iters=4)
    runner.train()
    return work_dir, runner


def test_own_checkpoint_holds_mmengine_objects_and_loads(trained):
    work_dir, _ = trained
    path = str(work_dir / 'iter_4.pth')
    with zipfile.ZipFile(path) as archive:
        pickled = next(archive.read(name) for name in archive.namelist()
                       if name.endswith('data.pkl'))
    # Without the allow-list these objects make weights_only loading fail.
    assert b'mmengine.logging.history_buffer' in pickled and b'getattr' in pickled
    checkpoint = CheckpointLoader.load_checkpoint(path, map_location='cpu')
    assert checkpoint['meta']['iter'] == 4
    assert set(checkpoint) >= {'state_dict', 'optimizer', 'message_hub', 'param_schedulers'}
    # The allow-list is global as well, so torch.load with its default weights_only=True works.
    assert torch.load(path)['meta']['iter'] == 4


def test_resume_continues_with_optimizer_and_scheduler_state(trained, tmp_path):
    work_dir, first = trained
    resumed = _runner(tmp_path, max_iters=6, load_from=str(work_dir / 'iter_4.pth'), resume=True)
    resumed.train()
    assert resumed.iter == 6
    scheduler = resumed.param_schedulers[0]
    assert scheduler.last_step == 6
    # MultiStepLR multiplied the lr by its gamma 0.1 at iteration 2, before the checkpoint was
    # written, and never again: exactly that product (a restarted schedule would give 0.01).
    assert resumed.optim_wrapper.get_lr()['lr'][0] == 0.01 * 0.1


class _WritesFile:
    """Unpickling this object creates a file: the stand-in for an arbitrary payload."""

    def __init__(self, path, via_shell=False):
        self.path = path
        self.via_shell = via_shell

    def __reduce__(self):
        if self.via_shell:
            return (os.system, (f'touch {self.path}', ))
        return (exec, (f'open({self.path!r}, "w").write("payload ran")', ))


@pytest.mark.parametrize('via_shell,culprit', [(False, r'builtins\.exec'),
                                               (True, r'posix\.system')])
def test_checkpoint_with_code_payload_is_refused_and_payload_never_runs(
        tmp_path, via_shell, culprit):
    sentinel = tmp_path / 'payload_ran'
    path = tmp_path / 'hostile.pth'
    payload = _WritesFile(str(sentinel), via_shell)
    torch.save({'state_dict': {'w': torch.ones(1)}, 'meta': payload}, path)
    with pytest.raises(UnsafeCheckpointError, match=r'hostile\.pth.*' + culprit):
        CheckpointLoader.load_checkpoint(str(path), map_location='cpu')
    # Through a runner (load_from / --resume / tools/test.py all go this way).
    runner = _runner(tmp_path / 'work', max_iters=1)
    with pytest.raises(UnsafeCheckpointError):
        runner.load_checkpoint(str(path))
    assert not sentinel.exists()
    assert isinstance(UnsafeCheckpointError('x'), pickle.UnpicklingError)


class _ReachesGlobals:
    """Pickles as getattr(HistoryBuffer.__init__, '__globals__'): allowed classes, a foreign
    attribute."""

    def __reduce__(self):
        from mmengine.logging import HistoryBuffer
        return (getattr, (HistoryBuffer.__init__, '__globals__'))


def test_getattr_is_allowed_only_for_history_buffer_statistics(tmp_path):
    path = tmp_path / 'getattr.pth'
    torch.save({'meta': _ReachesGlobals()}, path)
    with pytest.raises(UnsafeCheckpointError, match='getattr'):
        CheckpointLoader.load_checkpoint(str(path))


def test_pretrained_init_cfg_refuses_payload(tmp_path):
    from mmengine.model import BaseModule

    sentinel = tmp_path / 'payload_ran'
    path = tmp_path / 'hostile_pretrained.pth'
    torch.save({'weight': _WritesFile(str(sentinel))}, path)
    module = BaseModule(init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(UnsafeCheckpointError, match='hostile_pretrained.pth'):
        module.init_weights()
    assert not sentinel.exists()


@pytest.mark.parametrize('content', [b'', b'not a checkpoint at all'])
def test_truncated_or_foreign_file_gets_a_clear_error(tmp_path, trained, content):
    work_dir, _ = trained
    path = tmp_path / 'broken.pth'
    good = (work_dir / 'iter_4.pth').read_bytes()
    path.write_bytes(content or good[:len(good) // 2])
    with pytest.raises(CorruptCheckpointError, match='broken.pth'):
        CheckpointLoader.load_checkpoint(str(path), map_location='cpu')


def test_missing_file_names_the_path(tmp_path):
    missing = os.path.join(tmp_path, 'nowhere.pth')
    with pytest.raises(FileNotFoundError, match='nowhere.pth'):
        CheckpointLoader.load_checkpoint(missing)
