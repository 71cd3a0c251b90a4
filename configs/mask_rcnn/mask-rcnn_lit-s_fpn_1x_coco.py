# Mask R-CNN 1x, LIT-S: as LIT-Ti, plus the authors' LIT-S choices: drop path 0.2 and no weight
# decay on relative-position tables and norms.
_base_ = ['./mask-rcnn_pvtv2-b2_fpn_1x_coco.py', '../_base_/backbones/lit-s.py']
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
