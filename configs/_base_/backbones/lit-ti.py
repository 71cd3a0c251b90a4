# LIT-Ti as a dense-prediction backbone (four NCHW maps, strides 4-32), initialised from the
# authors' ImageNet-1k checkpoint. A task config takes it with
#   model = dict(backbone={{_base_.backbone}}, neck=dict(in_channels={{_base_.backbone_channels}}))
# where `_delete_` replaces the inherited backbone with this one as a whole.
backbone = dict(
    _delete_=True,
    type='mmsparsevit.LIT',
    arch='tiny',
    drop_path_rate=0.1,
    init_cfg=dict(
        type='Pretrained',
        checkpoint='https://github.com/ziplab/LIT/releases/download/v1.0/lit_ti.pth'))
backbone_channels = [64, 128, 320, 512]
