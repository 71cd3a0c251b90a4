# UperNet 160k, VVT-small (same stage widths as VVT-tiny, deeper stages).
_base_ = ['./upernet_swin-t_4xb4-160k_ade20k-512x512.py', '../_base_/backbones/vvt-s.py']
custom_imports = dict(imports=['mmsparsevit.models'], allow_failed_imports=False)

model = dict(
    backbone={{_base_.backbone}},
    decode_head=dict(in_channels={{_base_.backbone_channels}}),
    auxiliary_head=dict(in_channels=320))  # stage 3 (stride 16)
