# RetinaNet 1x, VVT-small (same stage widths as VVT-tiny, deeper stages).
_base_ = ['./retinanet_pvtv2-b2_fpn_1x_coco.py', '../_base_/backbones/vvt-s.py']
custom_imports = dict(imports=['mmsparsevit.models'], allow_failed_imports=False)

model = dict(
    backbone={{_base_.backbone}},
    neck=dict(in_channels={{_base_.backbone_channels}}))
