# Semantic FPN 80k, LIT-S: the LIT-Ti recipe (offset convolutions at 0.01x the lr) plus the
# authors' LIT-S choices for ADE20K: drop path 0.2, relative-position tables laid out for
# 512-pixel inputs, a LayerNorm on every output.
_base_ = ['./fpn_pvtv2-b2_4xb4-80k_ade20k-512x512.py', '../_base_/backbones/lit-s_ade20k.py']
custom_imports = dict(imports=['mmsparsevit.models'], allow_failed_imports=False)

model = dict(
    backbone={{_base_.backbone}},
    neck=dict(in_channels={{_base_.backbone_channels}}))

optim_wrapper = dict(
    paramwise_cfg=dict(custom_keys={'conv_offset': dict(lr_mult=0.01)}))
