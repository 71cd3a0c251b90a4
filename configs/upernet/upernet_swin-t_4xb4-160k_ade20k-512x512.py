# UperNet 160k, Swin-T baseline, with Swin's ADE20K protocol: 512x512 crops, AdamW (lr 6e-5,
# weight decay 0.01, none on position tables and norms), 1500-iteration linear warm-up, then
# linear (poly, power 1) decay over 160k iterations, 16 images per iteration (4 GPUs x 4).
# Every UperNet config in this folder inherits this protocol. mmdet's SwinTransformer converts
# the official checkpoint on load, so every config of this package uses the same Swin-T file.
_base_ = 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'
custom_imports = dict(imports=['mmdet.models'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='mmdet.SwinTransformer',
        convert_weights=True,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='https://github.com/SwinTransformer/storage/releases/download/v1.0.0/'
            'swin_tiny_patch4_window7_224.pth')))

train_dataloader = dict(batch_size=4)
