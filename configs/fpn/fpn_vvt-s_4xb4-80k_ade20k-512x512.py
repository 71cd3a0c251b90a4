# Semantic FPN 80k, VVT-small (same stage widths as VVT-tiny, deeper stages).
_base_ = ['./fpn_pvtv2-b2_4xb4-80k_ade20k-512x512.py', '../_base_/backbones/vvt-s.py']
custom_imports = dict(imports=['mmsparsevit.models'], allow_failed_imports=False)

model = dict(
    backbone={{_base_.backbone}},
    neck=dict(in_channels={{_base_.backbone_channels}}))
