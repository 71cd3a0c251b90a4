"""A NaN loss on one rank of a two-process torchrun (CPU, gloo) run stops or skips the step on
every rank together, in the same iteration."""
import json
import sys

import pytest
from ddp_checks import PROBE_DIR, run_bounded, tool_env
from non_finite_ddp_run import NAN_ITERATION, NAN_RANK, NUM_ITERS

pytestmark = pytest.mark.slow
# Far above the few seconds the run takes, far below gloo's 30-minute collective timeout: a
# rank left waiting in an all-reduce fails the test instead of blocking it.
HANG_TIMEOUT_S = 120


def _run(tmp_path, action):
    work_dir = tmp_path / action
    work_dir.mkdir()
    run_bounded([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                 '--nproc-per-node', '2', str(PROBE_DIR / 'non_finite_ddp_run.py'), str(work_dir),
                 action], tool_env(), tmp_path / f'{action}.log', timeout=HANG_TIMEOUT_S)
    return [json.loads((work_dir / f'rank{rank}.json').read_text()) for rank in (0, 1)]


def test_nan_on_one_rank_stops_every_rank_at_that_iteration(tmp_path):
    records = _run(tmp_path, 'stop')
    for record in records:
        assert record['error'] is not None, record
        assert record['error'].startswith(
            f'the training loss is NaN on rank {NAN_RANK} of 2 at iteration {NAN_ITERATION} '
            f'(epoch 1); rank {record["rank"]} had loss=')
        assert 'Training stopped before this step changed the weights' in record['error']
    assert records[0]['weight'] == records[1]['weight']


def test_nan_on_one_rank_is_skipped_by_every_rank(tmp_path):
    records = _run(tmp_path, 'skip')
    assert [r['error'] for r in records] == [None, None]
    assert [r['skipped_steps'] for r in records] == [1, 1]
    # Equal replicas: both ranks left out the same step (one stepping alone would differ).
    assert records[0]['weight'] == records[1]['weight']
    assert NUM_ITERS > NAN_ITERATION  # the skip was followed by good steps on both ranks
