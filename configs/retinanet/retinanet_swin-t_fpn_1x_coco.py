# RetinaNet 1x, Swin-T baseline, with Swin's optimiser: AdamW (lr 1e-4, weight decay 0.05,
# none on position tables and norms), steps at epochs 8 and 11, single-scale 1333x800.
# Stage 1 is not emitted: RetinaNet's FPN starts at stride 8, and an unused output norm
# would leave parameters without gradients under DDP.
_base_ = [
    'mmdet::swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py', '../_base_/tta/coco_detection_flip.py'
]

model = dict(
    backbone=dict(
        type='mmdet.SwinTransformer',
        init_cfg=dict(
            type='Pretrained',
            checkpoint='https://github.com/SwinTransformer/storage/releases/download/v1.0.0/'
            'swin_tiny_patch4_window7_224.pth')))

optim_wrapper = dict(
    optimizer=dict(
        _delete_=True,
        type='AdamW',
        lr=1e-4,
        betas=(0.9, 0.999),
        weight_decay=0.05),
    paramwise_cfg=dict(
        custom_keys={
            'absolute_pos_embed': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
        }))
