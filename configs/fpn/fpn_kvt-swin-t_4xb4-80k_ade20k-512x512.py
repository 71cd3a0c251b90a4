# Semantic FPN 80k, KVT-Swin-T: the Swin-T baseline with k-NN attention inside each window and
# everything else unchanged.
_base_ = './fpn_swin-t_4xb4-80k_ade20k-512x512.py'
custom_imports = dict(
    imports=['mmdet.models', 'mmsparsevit.models'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmsparsevit.KVT',
        topk=0.5,
        backbone={{_base_.model.backbone}}))
