"""Two-process DDP on CPU through tools/dist_train.sh and tools/dist_test.sh (torchrun, gloo)."""
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from ddp_checks import (NUM_PROCS, TOOLS, TRAIN_ITERS, assert_checkpoint_matches_ranks,
                        assert_ranks_took_part, coco_image_ids, make_coco_data, rank_records,
                        read_test_metrics, run_bounded, tool_env, write_detector_config)

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def torchrun_training(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp('torchrun')
    data = make_coco_data(root / 'data')
    probe = root / 'probe'
    # LIT: MLP-only stages 0-1, attention stages 2-3, patch embedding and stage 0 frozen.
    config = write_detector_config(root / 'retinanet_lit_ddp.py', data, probe, backbone='LIT',
                                   frozen_stages=1)
    work_dir = root / 'work'
    run_bounded(['bash', str(TOOLS / 'dist_train.sh'), str(config), str(NUM_PROCS),
                 '--work-dir', str(work_dir)], tool_env(), root / 'dist_train.log')
    return SimpleNamespace(root=root, data=data, config=config, work_dir=work_dir,
                           records=rank_records(probe),
                           checkpoint=work_dir / f'iter_{TRAIN_ITERS}.pth')


def rank0_log(work_dir: Path) -> str:
    logs = sorted(work_dir.glob('*/*.log'))
    assert len(logs) == 1, logs
    return logs[0].read_text()


def test_both_ranks_trained_on_their_own_shard(torchrun_training):
    run = torchrun_training
    assert_ranks_took_part(run.records, 'pytorch',
                           coco_image_ids(run.data / 'annotations/instances_train.json'))
    log = rank0_log(run.work_dir)
    assert 'Distributed launcher: pytorch' in log
    assert 'Distributed training: True' in log
    assert f'GPU number: {NUM_PROCS}' in log  # mmengine's name for the world size
    assert f'Iter(train) [{TRAIN_ITERS}/{TRAIN_ITERS}]' in log


def test_checkpoint_holds_the_weights_of_every_rank(torchrun_training):
    assert torchrun_training.checkpoint.is_file()
    assert_checkpoint_matches_ranks(torchrun_training.records, torchrun_training.checkpoint)


def test_frozen_stages_train_under_ddp_without_unused_parameter_search(torchrun_training):
    """LIT with frozen_stages=1 and MLP-only early stages: plain DDP (find_unused_parameters
    False, the default) must neither fail nor hang, and the frozen part must not move."""
    record = torchrun_training.records[0]
    frozen = sorted(n for n, grad in record['requires_grad'].items() if not grad)
    assert frozen and all(n.startswith('backbone.') for n in frozen)
    assert any('patch_embed' in n for n in frozen)
    assert all(record['params_before'][n] == record['params_after'][n] for n in frozen)
    trainable_backbone = [n for n, grad in record['requires_grad'].items()
                          if grad and n.startswith('backbone.')]
    assert trainable_backbone
    assert all(record['params_before'][n] != record['params_after'][n]
               for n in trainable_backbone)


def load_predictions(path: Path) -> dict:
    with open(path, 'rb') as f:  # our own dump, written by tools/test.py --out
        return {p['img_id']: p for p in pickle.load(f)}


def test_dist_test_matches_single_process_test(torchrun_training):
    run = torchrun_training
    single_dir, dist_dir = run.root / 'test_single', run.root / 'test_dist'
    env = tool_env()
    run_bounded([env['PYTHON'], str(TOOLS / 'test.py'), str(run.config), str(run.checkpoint),
                 '--work-dir', str(single_dir), '--out', str(single_dir / 'preds.pkl')],
                env, run.root / 'test_single.log')
    run_bounded(['bash', str(TOOLS / 'dist_test.sh'), str(run.config), str(run.checkpoint),
                 str(NUM_PROCS), '--work-dir', str(dist_dir), '--out',
                 str(dist_dir / 'preds.pkl')], env, run.root / 'dist_test.log')

    single, dist = read_test_metrics(single_dir), read_test_metrics(dist_dir)
    assert single == dist
    assert single['coco/bbox_mAP_50'] > 0, single

    # Every test image once, in both runs (the sampler pads 5 images to 6 for 2 ranks and the
    # evaluator must drop the duplicate), with the same boxes.
    single_preds = load_predictions(single_dir / 'preds.pkl')
    dist_preds = load_predictions(dist_dir / 'preds.pkl')
    val_ids = coco_image_ids(run.data / 'annotations/instances_val.json', with_annotations=False)
    assert sorted(single_preds) == sorted(dist_preds) == val_ids
    for img_id, expected in single_preds.items():
        got = dist_preds[img_id]['pred_instances']
        want = expected['pred_instances']
        assert len(want['scores']) > 0
        np.testing.assert_array_equal(got['labels'].numpy(), want['labels'].numpy())
        # Not bitwise: an image meets other batch partners (2 + 2 + 1 in one process, 2 + 1 on
        # each rank) and convolutions and matmuls block their sums by batch size, so the two
        # runs differ by float32 rounding carried through the network; 1e-4 relative (1e-2 px
        # on boxes of 100 px) is far above that and far below a wrong image or wrong weights.
        np.testing.assert_allclose(got['scores'].numpy(), want['scores'].numpy(), rtol=1e-4,
                                   atol=1e-6)
        np.testing.assert_allclose(got['bboxes'].numpy(), want['bboxes'].numpy(), rtol=1e-4,
                                   atol=1e-3)
