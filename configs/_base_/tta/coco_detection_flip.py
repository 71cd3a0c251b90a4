# Flip test-time augmentation for COCO detectors (`tools/test.py CONFIG CKPT --tta`): every
# image is predicted as it is and mirrored, at the single test scale, and mmdet's DetTTAModel
# merges the two sets of boxes by NMS. (mmdet 3.3's DetTTAModel merges boxes only, so the
# Mask R-CNN configs carry no TTA.)
tta_model = dict(
    type='DetTTAModel',
    tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(
        type='TestTimeAug',
        transforms=[
            [dict(type='Resize', scale=(1333, 800), keep_ratio=True)],
            [dict(type='RandomFlip', prob=1.), dict(type='RandomFlip', prob=0.)],
            [dict(type='LoadAnnotations', with_bbox=True)],
            [
                dict(
                    type='PackDetInputs',
                    meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                               'scale_factor', 'flip', 'flip_direction'))
            ],
        ])
]
