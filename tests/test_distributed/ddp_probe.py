"""A hook that records, per rank, what a distributed training run did.

The distributed tests add ``dict(type='DDPProbeHook', out_dir=...)`` to a config's
``custom_hooks`` (with this directory on ``PYTHONPATH`` and ``ddp_probe`` in
``custom_imports``). Every rank then writes ``rank<R>.json`` with its rank and world size, the
process-group backend, the model wrapper, the ids of the images it trained on at every
iteration, and a SHA-256 digest of every parameter before and after training. The tests compare
those files with each other and with the checkpoint that rank 0 saved.
"""
import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as torch_dist
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (equal digests mean bitwise equality)."""
    data = tensor.detach().cpu().contiguous()
    header = f'{data.dtype}{tuple(data.shape)}'.encode()
    return hashlib.sha256(header + data.numpy().tobytes()).hexdigest()


def parameter_digests(model: torch.nn.Module) -> Dict[str, str]:
    """Digest of every parameter, keyed by its name in the unwrapped model's state dict."""
    return {name: tensor_digest(param) for name, param in model.named_parameters()}


@HOOKS.register_module()
class DDPProbeHook(Hook):
    """Write ``rank<R>.json`` into ``out_dir`` when training ends.

    Args:
        out_dir (str): Directory for the per-rank records.
    """

    priority = 'LOWEST'

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.record: dict = {}
        self.samples_per_iter: List[List[int]] = []

    def _model(self, runner) -> torch.nn.Module:
        return runner.model.module if is_model_wrapper(runner.model) else runner.model

    def before_train(self, runner) -> None:
        model = self._model(runner)
        sampler = runner.train_dataloader.sampler
        self.record = dict(
            rank=runner.rank,
            world_size=runner.world_size,
            env_rank=int(os.environ.get('RANK', '-1')),
            backend=torch_dist.get_backend() if torch_dist.is_initialized() else None,
            wrapper=type(runner.model).__name__,
            sampler=dict(type=type(sampler).__name__, rank=getattr(sampler, 'rank', None),
                         world_size=getattr(sampler, 'world_size', None)),
            launcher=runner.launcher,
            pid=os.getpid(),
            master_port=os.environ.get('MASTER_PORT'),
            slurm_job_id=os.environ.get('SLURM_JOB_ID'),
            params_before=parameter_digests(model),
        )

    def after_train_iter(self, runner, batch_idx: int, data_batch: Optional[dict] = None,
                         outputs: Optional[dict] = None) -> None:
        samples = data_batch['data_samples'] if data_batch else []
        self.samples_per_iter.append([int(s.metainfo['img_id']) for s in samples])

    def after_train(self, runner) -> None:
        model = self._model(runner)
        self.record.update(
            iters=runner.iter,
            samples_per_iter=self.samples_per_iter,
            params_after=parameter_digests(model),
            # read after training, when train() has re-applied frozen stages
            requires_grad={name: p.requires_grad for name, p in model.named_parameters()},
        )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f'rank{runner.rank}.json'
        path.write_text(json.dumps(self.record, indent=1))
