# Mask R-CNN 1x, PVTv2-b2 baseline, trained with PVT's detection protocol: AdamW (lr 2e-4,
# weight decay 1e-4), 500-iteration linear warm-up, lr x0.1 at epochs 8 and 11 of 12,
# single-scale 1333x800, 8 GPUs x 2 images. VVT, LIT and KVT-PVTv2 inherit this protocol.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmdet.PyramidVisionTransformerV2',
        embed_dims=64,
        num_layers=[3, 4, 6, 3],
        init_cfg=dict(
            type='Pretrained',
            checkpoint='https://github.com/whai362/PVT/releases/download/v2/pvt_v2_b2.pth')),
    neck=dict(in_channels=[64, 128, 320, 512]))

optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=2e-4, weight_decay=1e-4))
