# UperNet 160k, KVT-PVTv2-b2: the PVTv2-b2 baseline with k-NN attention (each query keeps
# its top-k keys) and everything else unchanged, so the two configs compare like for like.
_base_ = './upernet_pvtv2-b2_4xb4-160k_ade20k-512x512.py'
custom_imports = dict(
    imports=['mmdet.models', 'mmsparsevit.models'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmsparsevit.KVT',
        topk=0.5,
        backbone={{_base_.model.backbone}}))
