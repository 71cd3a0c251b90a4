# Semantic FPN 80k, LIT-Ti, with the authors' settings: AdamW (lr 1e-4, weight decay 1e-4),
# poly decay over 80k iterations at 512x512 (PVT's protocol). The deformable-offset
# convolutions of the token-merging layers learn at 0.01x the lr.
_base_ = ['./fpn_pvtv2-b2_4xb4-80k_ade20k-512x512.py', '../_base_/backbones/lit-ti.py']
custom_imports = dict(imports=['mmsparsevit.models'], allow_failed_imports=False)

model = dict(
    backbone={{_base_.backbone}},
    neck=dict(in_channels={{_base_.backbone_channels}}))

optim_wrapper = dict(
    paramwise_cfg=dict(custom_keys={'conv_offset': dict(lr_mult=0.01)}))
