# RetinaNet 1x, PVTv2-b2 baseline, trained with PVT's detection protocol: AdamW (lr 1e-4,
# weight decay 1e-4), 500-iteration linear warm-up, lr x0.1 at epochs 8 and 11 of 12,
# single-scale 1333x800, 8 GPUs x 2 images. VVT, LIT and KVT-PVTv2 inherit this protocol.
_base_ = ['mmdet::pvt/retinanet_pvtv2-b2_fpn_1x_coco.py', '../_base_/tta/coco_detection_flip.py']

model = dict(
    backbone=dict(
        type='mmdet.PyramidVisionTransformerV2',
        init_cfg=dict(
            type='Pretrained',
            checkpoint='https://github.com/whai362/PVT/releases/download/v2/pvt_v2_b2.pth')))
