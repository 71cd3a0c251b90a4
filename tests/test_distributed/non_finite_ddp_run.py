"""One rank of a two-process toy DDP training whose loss is NaN on rank 1 only.

``test_non_finite_ddp.py`` launches it with torchrun (CPU, gloo)::

    torchrun --nproc-per-node 2 non_finite_ddp_run.py WORK_DIR {stop,skip}

Each rank trains :class:`ToyRegressor` under ``NonFiniteLossHook(action=...)`` and writes
``WORK_DIR/rank<R>.json``: the message it stopped with (None when it finished), how many steps
it skipped and its final weights. Training errors other than ``NonFiniteLossError`` propagate.
"""
import json
import math
import sys
from pathlib import Path

import torch.distributed as torch_dist

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS / 'test_engine'), str(TESTS / 'test_tools')]
from robustness_utils import toy_runner  # noqa: E402

from mmsparsevit.engine import NonFiniteLossError, NonFiniteLossHook  # noqa: E402

NUM_ITERS = 4
NAN_RANK = 1
NAN_ITERATION = 3
# DefaultSampler without shuffling gives rank r the samples r, r + 2, r + 4, ...
SAMPLES = [(1.0, 2.0)] * (2 * NUM_ITERS)
SAMPLES[2 * (NAN_ITERATION - 1) + NAN_RANK] = (math.nan, 0.0)


def main(work_dir: Path, action: str) -> None:
    # mmengine's pytorch launcher calls torch.cuda.set_device; on CPU the group comes first.
    torch_dist.init_process_group('gloo')
    runner = toy_runner(
        work_dir, SAMPLES, max_iters=NUM_ITERS, launcher='pytorch',
        custom_hooks=[dict(type='mmsparsevit.NonFiniteLossHook', action=action)],
        cfg=dict(model_wrapper_cfg=dict(type='MMDistributedDataParallel', device_ids=None,
                                        broadcast_buffers=False)))
    error = None
    try:
        runner.train()
    except NonFiniteLossError as stopped:
        error = str(stopped)
    hook = next(hook for hook in runner.hooks if isinstance(hook, NonFiniteLossHook))
    record = dict(rank=runner.rank, error=error, skipped_steps=hook.skipped_steps,
                  weight=runner.model.module.weight.tolist())
    (work_dir / f'rank{runner.rank}.json').write_text(json.dumps(record))
    torch_dist.destroy_process_group()


if __name__ == '__main__':
    main(Path(sys.argv[1]), sys.argv[2])
