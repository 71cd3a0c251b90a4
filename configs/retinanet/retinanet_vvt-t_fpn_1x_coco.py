# RetinaNet 1x, VVT-tiny, with PVT's detection protocol (see the PVTv2-b2 config).
_base_ = ['./retinanet_pvtv2-b2_fpn_1x_coco.py', '../_base_/backbones/vvt-t.py']
custom_imports = dict(imports=['mmsparsevit.models'], allow_failed_imports=False)

model = dict(
    backbone={{_base_.backbone}},
    neck=dict(in_channels={{_base_.backbone_channels}}))
