# Mask R-CNN 1x, LIT-Ti, with the authors' settings: AdamW (lr 2e-4, weight decay 1e-4),
# 500-iteration warm-up, steps at epochs 8 and 11, single-scale 1333x800 (PVT's protocol).
# The deformable-offset convolutions of the token-merging layers learn at 0.01x the lr.
_base_ = ['./mask-rcnn_pvtv2-b2_fpn_1x_coco.py', '../_base_/backbones/lit-ti.py']
custom_imports = dict(imports=['mmsparsevit.models'], allow_failed_imports=False)

model = dict(
    backbone={{_base_.backbone}},
    neck=dict(in_channels={{_base_.backbone_channels}}))

optim_wrapper = dict(
    paramwise_cfg=dict(custom_keys={'conv_offset': dict(lr_mult=0.01)}))
