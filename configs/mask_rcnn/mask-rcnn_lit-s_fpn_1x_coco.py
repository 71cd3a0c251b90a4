# Mask R-CNN 1x, LIT-S: the LIT-Ti recipe (offset convolutions at 0.01x the lr) plus the
# authors' LIT-S choices: drop path 0.2, relative-position tables laid out for 800-pixel
# inputs, no weight decay on those tables and on norms.
_base_ = ['./mask-rcnn_pvtv2-b2_fpn_1x_coco.py', '../_base_/backbones/lit-s_coco.py']
custom_imports = dict(imports=['mmsparsevit.models'], allow_failed_imports=False)

model = dict(
    backbone={{_base_.backbone}},
    neck=dict(in_channels={{_base_.backbone_channels}}))

optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            'conv_offset': dict(lr_mult=0.01),
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
        }))
