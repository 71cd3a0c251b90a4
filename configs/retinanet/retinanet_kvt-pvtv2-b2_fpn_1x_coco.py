# RetinaNet 1x, KVT-PVTv2-b2: the PVTv2-b2 baseline with k-NN attention (each query keeps
# its top-k keys) and everything else unchanged, so the two configs compare like for like.
_base_ = './retinanet_pvtv2-b2_fpn_1x_coco.py'
custom_imports = dict(imports=['mmsparsevit.models'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmsparsevit.KVT',
        topk=0.5,
        backbone={{_base_.model.backbone}}))
