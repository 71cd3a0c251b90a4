"""What the torchrun and Slurm tests share: the tiny detector set-up, bounded subprocesses and
the checks that a distributed run really was one."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from ddp_probe import tensor_digest
from mmengine.runner import CheckpointLoader

import mmsparsevit  # noqa: F401  allow-lists what mmengine checkpoints hold for torch.load

REPO = Path(__file__).resolve().parents[2]
PROBE_DIR = Path(__file__).resolve().parent
TOOLS = REPO / 'tools'
sys.path.insert(0, str(TOOLS / 'dataset_converters'))
from make_demo_data import make_demo_dataset  # noqa: E402

NUM_PROCS = 2
NUM_TRAIN_IMAGES = 8
# Odd, so the distributed sampler pads the test set and the evaluator must drop the padding.
NUM_VAL_IMAGES = 5
IMAGE_SIZE = 64
BATCH_PER_RANK = 2
TRAIN_ITERS = 3
LAUNCH_TIMEOUT_S = 240


def make_coco_data(root: Path) -> Path:
    """Write the seeded tiny COCO-format shapes dataset under ``root``; return its path."""
    make_demo_dataset('coco', root / 'coco', num_train=NUM_TRAIN_IMAGES,
                      num_val=NUM_VAL_IMAGES, size=IMAGE_SIZE, max_objects=3, seed=0)
    return root / 'coco'


def tool_env(extra: Optional[Mapping[str, str]] = None,
             base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Environment for the tools: this interpreter, the probe hook importable, 1 thread each."""
    env = dict(os.environ if base is None else base)
    env['PYTHON'] = sys.executable
    env['PATH'] = f'{Path(sys.executable).parent}{os.pathsep}{env.get("PATH", "")}'
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (str(PROBE_DIR), str(REPO), env.get('PYTHONPATH')) if p)
    env['OMP_NUM_THREADS'] = '1'
    env.update(extra or {})
    return env


def run_bounded(command: Sequence[str], env: Mapping[str, str], log_path: Path,
                timeout: float = LAUNCH_TIMEOUT_S) -> None:
    """Run ``command`` in its own process group; fail with its log on error or on timeout.

    On timeout the whole group (launcher and every worker) is killed, so a hung collective
    fails the test instead of blocking the run.
    """
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(list(command), env=dict(env), cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f'{" ".join(command)} did not finish in {timeout} s (hang?); '
                                 f'log:\n{log_path.read_text()[-6000:]}')
    if returncode != 0:
        raise AssertionError(f'{" ".join(command)} exited with {returncode}; '
                             f'log:\n{log_path.read_text()[-6000:]}')


def rank_records(probe_dir: Path) -> List[dict]:
    """The per-rank records written by ``DDPProbeHook``, sorted by rank."""
    records = [json.loads(p.read_text()) for p in sorted(probe_dir.glob('rank*.json'))]
    return sorted(records, key=lambda record: record['rank'])


def coco_image_ids(ann_file: Path, with_annotations: bool = True) -> List[int]:
    """Ids of the images in a COCO file (only those with objects, as filter_empty_gt keeps)."""
    coco = json.loads(ann_file.read_text())
    annotated = {a['image_id'] for a in coco['annotations']}
    return sorted(i['id'] for i in coco['images'] if not with_annotations or i['id'] in annotated)


def assert_ranks_took_part(records: List[dict], launcher: str, train_ids: Sequence[int],
                           world_size: int = NUM_PROCS) -> None:
    """Every rank trained in one gloo process group on its own shard of the data."""
    assert [r['rank'] for r in records] == list(range(world_size)), records
    assert len({r['pid'] for r in records}) == world_size
    for record in records:
        assert record['world_size'] == world_size
        assert record['env_rank'] == record['rank']
        assert record['launcher'] == launcher
        # the configs ask for nccl, as OpenMMLab runtime configs do; CPU-only means gloo
        assert record['backend'] == 'gloo'
        assert record['wrapper'] == 'MMDistributedDataParallel'
        assert record['sampler']['rank'] == record['rank']
        assert record['sampler']['world_size'] == world_size
        assert record['iters'] == TRAIN_ITERS
        assert [len(ids) for ids in record['samples_per_iter']] == [BATCH_PER_RANK] * TRAIN_ITERS
    # The sampler shards one shuffled order: within a pass over the data no image is drawn
    # twice, by any rank.
    per_iter = world_size * BATCH_PER_RANK
    iters_per_pass = len(train_ids) // per_iter
    assert iters_per_pass >= 1
    first_pass = [i for r in records for it in r['samples_per_iter'][:iters_per_pass] for i in it]
    assert len(set(first_pass)) == len(first_pass) == iters_per_pass * per_iter, first_pass
    assert set(first_pass) <= set(train_ids)


def assert_checkpoint_matches_ranks(records: List[dict], checkpoint: Path) -> None:
    """The saved weights equal, bit for bit, the weights every rank held after training.

    The ranks trained on different images, so equal weights mean the gradients were averaged;
    weights that moved mean training happened at all; frozen parameters must not move.
    """
    state = CheckpointLoader.load_checkpoint(str(checkpoint), map_location='cpu')['state_dict']
    saved = {name: tensor_digest(state[name]) for name in records[0]['params_after']}
    for record in records:
        assert record['params_after'] == saved, f'rank {record["rank"]} differs from {checkpoint}'
    trainable = [n for n, grad in records[0]['requires_grad'].items() if grad]
    frozen = [n for n, grad in records[0]['requires_grad'].items() if not grad]
    moved = [n for n in trainable if records[0]['params_before'][n] != saved[n]]
    assert len(moved) > len(trainable) // 2, f'only {len(moved)}/{len(trainable)} moved'
    assert all(records[0]['params_before'][n] == saved[n] for n in frozen)


def read_test_metrics(work_dir: Path) -> Dict[str, float]:
    """The metrics of the one ``tools/test.py`` run logged under ``work_dir``."""
    found = sorted(work_dir.glob('*/*.json'))
    assert len(found) == 1, f'expected one metrics file under {work_dir}, found {found}'
    metrics = json.loads(found[0].read_text().splitlines()[-1])
    return {k: v for k, v in metrics.items() if k.startswith('coco/')}


# A RetinaNet small enough for a few CPU iterations, with a 4-stage backbone of our own at a
# fraction of its preset width. The OpenMMLab-style 'nccl' backend below must become gloo here.
DETECTOR_CONFIG = '''
_base_ = {base!r}
default_scope = 'mmdet'
custom_imports = dict(imports=['mmsparsevit.models', 'ddp_probe'], allow_failed_imports=False)

model = dict(
    type='RetinaNet',
    data_preprocessor=dict(
        type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True, pad_size_divisor=32),
    backbone=dict(
        type='mmsparsevit.{backbone}',
        arch=dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                  mlp_ratios=(2, 2, 2, 2)),
        frozen_stages={frozen_stages},
        drop_path_rate=0.0),
    neck=dict(type='FPN', in_channels=[16, 32, 48, 64], out_channels=32, start_level=1,
              add_extra_convs='on_input', num_outs=5),
    bbox_head=dict(
        type='RetinaHead', num_classes=3, in_channels=32, stacked_convs=1, feat_channels=32,
        anchor_generator=dict(type='AnchorGenerator', octave_base_scale=4, scales_per_octave=3,
                              ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128]),
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[.0, .0, .0, .0],
                        target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25,
                      loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
    train_cfg=dict(
        assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0,
                      ignore_iof_thr=-1),
        sampler=dict(type='PseudoSampler'), allowed_border=-1, pos_weight=-1, debug=False),
    # score_thr=0 keeps low-confidence boxes, so that the predictions compared across
    # launchers are not empty after a few iterations.
    test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=0.0,
                  nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))

train_dataloader = dict(
    batch_size={batch}, num_workers=0, persistent_workers=False,
    dataset=dict(data_root={data_root!r}))
test_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root={data_root!r}))
test_evaluator = dict(ann_file={data_root!r} + 'annotations/instances_val.json')
val_dataloader = None
val_evaluator = None
val_cfg = None
train_cfg = dict(type='IterBasedTrainLoop', max_iters={iters}, val_interval={iters})
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3,
                                                         weight_decay=1e-4))
param_scheduler = []
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=1),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval={iters}, by_epoch=False),
    sampler_seed=dict(type='DistSamplerSeedHook'))
custom_hooks = [dict(type='DDPProbeHook', out_dir={probe_dir!r})]
# As in every OpenMMLab runtime config: the tools must turn it into gloo on a CPU-only machine.
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='nccl'))
log_processor = dict(type='LogProcessor', window_size=1, by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0)
'''


def write_detector_config(path: Path, data_root: Path, probe_dir: Path, backbone: str,
                          frozen_stages: int) -> Path:
    """Write the tiny distributed-test RetinaNet config to ``path``."""
    path.write_text(DETECTOR_CONFIG.format(
        base=str(REPO / 'configs/_base_/datasets/shapes_coco_detection.py'),
        backbone=backbone, frozen_stages=frozen_stages, batch=BATCH_PER_RANK,
        data_root=f'{data_root}/', iters=TRAIN_ITERS, probe_dir=str(probe_dir)))
    return path
