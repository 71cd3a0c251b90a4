# VVT-small as a dense-prediction backbone (four NCHW maps, strides 4-32), initialised from the
# authors' ImageNet-1k checkpoint. A task config takes it with
#   model = dict(backbone={{_base_.backbone}}, neck=dict(in_channels={{_base_.backbone_channels}}))
# where `_delete_` replaces the inherited backbone with this one as a whole.
# The authors publish VVT's weights only behind OneDrive links that a program cannot fetch:
# download VVT-small 224 from the 'Weight' table of
# https://github.com/OpenNLPLab/Vicinity-Vision-Transformer and save it, unchanged, as
# checkpoints/vvt_small.pth (relative to where tools/train.py runs).
backbone = dict(
    _delete_=True,
    type='mmsparsevit.VVT',
    arch='small',
    drop_path_rate=0.1,
    init_cfg=dict(type='Pretrained', checkpoint='checkpoints/vvt_small.pth'))
backbone_channels = [96, 160, 320, 512]
