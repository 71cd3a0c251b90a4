"""KVT around mmdet's Swin with frozen_stages trains under two-process torchrun DDP with
``find_unused_parameters=False``.

mmdet's Swin freezes its stages only in ``train()``, which mmengine's runner calls after DDP
has registered the parameters that require gradients; DDP would then wait for gradients of the
frozen ones and fail in the second iteration, unless the freezing already holds when the
backbone is built.
"""
import pytest
from ddp_checks import (NUM_PROCS, TOOLS, assert_checkpoint_matches_ranks, make_coco_data,
                        rank_records, run_bounded, tool_env, write_detector_config)

pytestmark = pytest.mark.slow

SWIN_EMBED_DIMS = 16
# Replaces the detector's backbone; stage 1 has two blocks, the second with shifted windows.
KVT_SWIN_BACKBONE = f'''
model['backbone'] = dict(
    type='mmsparsevit.KVT', topk=0.5,
    backbone=dict(type='mmdet.SwinTransformer', embed_dims={SWIN_EMBED_DIMS},
                  depths=(1, 2, 1, 1), num_heads=(1, 1, 2, 2), window_size=7,
                  frozen_stages=1, drop_path_rate=0.0))
model['neck']['in_channels'] = {[SWIN_EMBED_DIMS * 2**i for i in range(4)]}
model_wrapper_cfg = dict(type='MMDistributedDataParallel', find_unused_parameters=False)
'''


def test_kvt_swin_with_frozen_stages_trains_under_plain_ddp(tmp_path):
    data = make_coco_data(tmp_path / 'data')
    probe = tmp_path / 'probe'
    config = write_detector_config(tmp_path / 'retinanet_kvt_swin_ddp.py', data, probe,
                                   backbone='LIT', frozen_stages=1)
    config.write_text(config.read_text() + KVT_SWIN_BACKBONE)
    work_dir = tmp_path / 'work'
    run_bounded(['bash', str(TOOLS / 'dist_train.sh'), str(config), str(NUM_PROCS),
                 '--work-dir', str(work_dir)], tool_env(), tmp_path / 'dist_train.log')
    records = rank_records(probe)
    assert [record['rank'] for record in records] == list(range(NUM_PROCS))
    assert all(record['wrapper'] == 'MMDistributedDataParallel' for record in records)
    frozen = sorted(n for n, grad in records[0]['requires_grad'].items() if not grad)
    assert {n.split('.')[1] for n in frozen} == {'patch_embed', 'stages', 'norm0'}
    assert all(n.startswith(('backbone.patch_embed.', 'backbone.stages.0.', 'backbone.norm0.'))
               for n in frozen)
    # Both ranks hold the saved weights, the frozen ones unchanged, most others moved.
    train_iters = records[0]['iters']
    assert_checkpoint_matches_ranks(records, work_dir / f'iter_{train_iters}.pth')
