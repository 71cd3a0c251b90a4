# Mask R-CNN 1x, KVT-Swin-T: the Swin-T baseline with k-NN attention inside each window and
# everything else unchanged.
_base_ = './mask-rcnn_swin-t_fpn_1x_coco.py'
custom_imports = dict(imports=['mmsparsevit.models'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmsparsevit.KVT',
        topk=0.5,
        backbone={{_base_.model.backbone}}))
