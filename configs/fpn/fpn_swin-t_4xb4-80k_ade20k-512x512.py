# Semantic FPN 80k, Swin-T baseline, under the same ADE20K protocol as the other Semantic FPN
# configs (see the PVTv2-b2 config). mmdet's SwinTransformer converts the official
# checkpoint on load, so every config of this package uses the same Swin-T file.
_base_ = './fpn_pvtv2-b2_4xb4-80k_ade20k-512x512.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmdet.SwinTransformer',
        embed_dims=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        mlp_ratio=4,
        qkv_bias=True,
        qk_scale=None,
        drop_rate=0.,
        attn_drop_rate=0.,
        drop_path_rate=0.2,
        patch_norm=True,
        out_indices=(0, 1, 2, 3),
        convert_weights=True,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='https://github.com/SwinTransformer/storage/releases/download/v1.0.0/'
            'swin_tiny_patch4_window7_224.pth')),
    neck=dict(in_channels=[96, 192, 384, 768]))
