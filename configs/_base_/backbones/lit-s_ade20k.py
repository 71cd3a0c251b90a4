# LIT-S as an ADE20K backbone (four NCHW maps, strides 4-32), initialised from the authors'
# ImageNet-1k checkpoint. As in the authors' segmentation models, the relative-position
# tables are laid out for 512-pixel inputs (the 224-pixel ImageNet tables are resized on
# loading) and all four outputs are layer-normed. A task config takes it with
#   model = dict(backbone={{_base_.backbone}}, neck=dict(in_channels={{_base_.backbone_channels}}))
# where `_delete_` replaces the inherited backbone with this one as a whole.
backbone = dict(
    _delete_=True,
    type='mmsparsevit.LIT',
    arch='small',
    pretrain_img_size=512,
    out_norms=(0, 1, 2, 3),
    drop_path_rate=0.2,
    init_cfg=dict(
        type='Pretrained',
        checkpoint='https://github.com/ziplab/LIT/releases/download/v1.0/lit_s.pth'))
backbone_channels = [96, 192, 384, 768]
