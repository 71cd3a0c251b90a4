# The segmentation demo: Semantic FPN with a small VVT, trained from scratch on the embedded
# shapes dataset in ADE20K layout (tools/dataset_converters/make_demo_data.py) on a CPU in
# minutes, evaluated by mIoU on the held-out split. Run it with `make demo-seg`.
_base_ = [
    '../_base_/datasets/shapes_ade20k.py',
    'mmseg::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmsparsevit.models'], allow_failed_imports=False)

# VVT-T's layout at a third of its width with one block per stage (see the detection demo).
backbone_channels = [32, 64, 128, 256]
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(
        type='SegDataPreProcessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_val=0,
        seg_pad_val=255,
        size={{_base_.crop_size}}),
    backbone=dict(
        type='mmsparsevit.VVT',
        arch=dict(
            embed_dims=(32, 64, 128, 256),
            depths=(1, 1, 1, 1),
            num_heads=(1, 2, 4, 8),
            mlp_ratios=(4, 4, 4, 4)),
        drop_path_rate=0.0),
    neck=dict(type='FPN', in_channels=backbone_channels, out_channels=64, num_outs=4),
    decode_head=dict(
        type='FPNHead',
        in_channels=[64, 64, 64, 64],
        in_index=[0, 1, 2, 3],
        feature_strides=[4, 8, 16, 32],
        channels=64,
        dropout_ratio=0.1,
        num_classes=4,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

max_iters = 1000
# Validated every 125 iterations: the training curve (make demo-seg draws it) shows the mIoU.
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=125)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05),
    clip_grad=dict(max_norm=10, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='PolyLR', power=1.0, eta_min=1e-5, by_epoch=False, begin=50, end=max_iters)
]
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=500, max_keep_ckpts=2),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
