# Mask R-CNN 1x, Swin-T baseline, with Swin's own 1x recipe: multi-scale training (short side
# 480-800, or a 384-600 crop first, as in DETR), AdamW (lr 1e-4, weight decay 0.05, none on
# position tables and norms), 1000-iteration warm-up, lr x0.1 at epochs 8 and 11 of 12.
# mmdet ships this pipeline and optimiser in its 3x config; only the schedule changes here.
_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py'

model = dict(
    backbone=dict(
        type='mmdet.SwinTransformer',
        init_cfg=dict(
            type='Pretrained',
            checkpoint='https://github.com/SwinTransformer/storage/releases/download/v1.0.0/'
            'swin_tiny_patch4_window7_224.pth')))

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(
        type='LinearLR', start_factor=0.001, by_epoch=False, begin=0,
        end=1000),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[8, 11],
        gamma=0.1)
]
