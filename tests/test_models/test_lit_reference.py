# Copyright (c) mmsparsevit contributors. All rights reserved.
"""An independent, test-side transcription of the authors' LIT models and faithfulness tests.

The reference modules below are written from the method's equations with the official
parameter names and shapes (zhuang-group/LIT: ``LIT`` / ``LIT_Ti`` of the mmdet/mmseg
backbones, the ImageNet ``lit_s/m/b`` and ``lit_ti`` classifiers). They share no code with
mmsparsevit: deformable sampling comes from torchvision, the relative-position bias is
gathered with separate (dy, dx) indices, LIT-Ti floors the patch grid as the authors do.
Other LIT test files import the helpers from here.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import deform_conv2d as tv_deform_conv2d

from mmsparsevit.models.backbones import LIT

REF_ARCHS = {
    'tiny': dict(dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), heads=(1, 2, 5, 8),
                 ratios=(8, 8, 4, 4)),
    'small': dict(dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), heads=(3, 6, 12, 24),
                  ratios=(4, 4, 4, 4)),
    'medium': dict(dims=(96, 192, 384, 768), depths=(2, 2, 18, 2), heads=(3, 6, 12, 24),
                   ratios=(4, 4, 4, 4)),
    'base': dict(dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), heads=(4, 8, 16, 32),
                 ratios=(4, 4, 4, 4)),
}
# Published parameter counts of the ImageNet models without the 1000-class head.
PUBLISHED_WITHOUT_HEAD = {'tiny': 19_373_272, 'small': 27_204_720, 'medium': 48_603_264,
                          'base': 86_267_384}


class RefMlp(nn.Module):

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class RefDConv(nn.Module):
    """Official ``dconv``: weight, bias and a 2x2/stride-2 ``conv_offset``."""

    def __init__(self, cin, cout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 2, 2) / math.sqrt(4 * cin))
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)
        self.conv_offset = nn.Conv2d(cin, 8, 2, 2)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x):
        return tv_deform_conv2d(x, self.conv_offset(x), self.weight, self.bias, stride=2)


class RefMerge(nn.Module):
    """Official DTM container: ``dconv`` + ``norm_layer`` (BN) + GELU."""

    def __init__(self, cin, cout):
        super().__init__()
        self.dconv = RefDConv(cin, cout)
        self.norm_layer = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.gelu(self.norm_layer(self.dconv(x)))


class RefAttention(nn.Module):

    def __init__(self, dim, heads, table_hw=None, with_index=False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.table_hw = table_hw
        if table_hw is not None:
            th, tw = table_hw
            self.relative_position_bias_table = nn.Parameter(
                torch.randn((2 * th - 1) * (2 * tw - 1), heads) * 0.02)
            if with_index:  # the ImageNet models keep it as a buffer
                self.register_buffer('relative_position_index',
                                     torch.zeros(th * tw, th * tw, dtype=torch.long))

    def bias(self, h, w):
        th, tw = self.table_hw
        grid = self.relative_position_bias_table.t().reshape(1, self.heads, 2 * th - 1, 2 * tw - 1)
        grid = F.interpolate(grid, size=(2 * h - 1, 2 * w - 1), mode='bicubic')[0]
        rows = torch.arange(h).repeat_interleave(w)
        cols = torch.arange(w).repeat(h)
        dy = rows[:, None] - rows[None, :] + h - 1
        dx = cols[:, None] - cols[None, :] + w - 1
        return grid[:, dy, dx]

    def forward(self, x, h, w):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        logits = torch.einsum('bhnd,bhmd->bhnm', q, k) / math.sqrt(c // self.heads)
        if self.table_hw is not None:
            logits = logits + self.bias(h, w)
        out = torch.einsum('bhnm,bhmd->bhnd', logits.softmax(-1), v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class RefBlock(nn.Module):

    def __init__(self, dim, heads, ratio, msa, eps, table_hw=None, with_index=False):
        super().__init__()
        self.msa = msa
        if msa:
            self.norm1 = nn.LayerNorm(dim, eps=eps)
            self.attn = RefAttention(dim, heads, table_hw, with_index)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = RefMlp(dim, int(dim * ratio))

    def forward(self, x, h, w):
        if self.msa:
            x = x + self.attn(self.norm1(x), h, w)
        return x + self.mlp(self.norm2(x))


class RefPatchEmbed(nn.Module):

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 4, 4)
        self.norm = nn.LayerNorm(dim)


class RefLayer(nn.Module):

    def __init__(self, blocks, downsample=None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        if downsample is not None:
            self.downsample = downsample


class RefLIT(nn.Module):
    """Swin-style LIT-S/M/B: the authors' dense backbone (``imagenet=False``; tables for
    ``table_img`` inputs, output norms ``norm_indices``) or their ImageNet classifier."""

    def __init__(self, arch, table_img=800, norm_indices=(1, 2, 3), imagenet=False,
                 has_msa=(0, 0, 1, 1)):
        super().__init__()
        cfg = REF_ARCHS[arch] if isinstance(arch, str) else arch
        dims = cfg['dims']
        self.dims = dims
        self.norm_indices = () if imagenet else norm_indices
        self.patch_embed = RefPatchEmbed(dims[0])
        self.layers = nn.ModuleList()
        for i, depth in enumerate(cfg['depths']):
            side = table_img // 4 // 2**i
            blocks = [RefBlock(dims[i], cfg['heads'][i], cfg['ratios'][i], has_msa[i], 1e-5,
                               (side, side), imagenet) for _ in range(depth)]
            merge = RefMerge(dims[i], dims[i + 1]) if i < 3 else None
            self.layers.append(RefLayer(blocks, merge))
        for i in self.norm_indices:
            self.add_module(f'norm{i}', nn.LayerNorm(dims[i]))
        if imagenet:
            self.norm = nn.LayerNorm(dims[3])
            self.head = nn.Linear(dims[3], 1000)

    def forward(self, img):
        _, _, height, width = img.shape
        img = F.pad(img, (0, -width % 4, 0, -height % 4))
        x = self.patch_embed.proj(img)
        h, w = x.shape[2:]
        x = self.patch_embed.norm(x.flatten(2).transpose(1, 2))
        outs = []
        for i, layer in enumerate(self.layers):
            for blk in layer.blocks:
                x = blk(x, h, w)
            out = getattr(self, f'norm{i}')(x) if i in self.norm_indices else x
            outs.append(out.transpose(1, 2).reshape(x.shape[0], -1, h, w))
            if i < 3:
                merged = layer.downsample(x.transpose(1, 2).reshape(x.shape[0], -1, h, w))
                h, w = merged.shape[2:]
                x = merged.flatten(2).transpose(1, 2)
        return outs


class RefLITTi(nn.Module):
    """PVT-style LIT-Ti: the authors' ``LIT_Ti`` dense backbone or their ImageNet model."""

    def __init__(self, arch='tiny', img=224, imagenet=False, has_msa=(0, 0, 1, 1)):
        super().__init__()
        cfg = REF_ARCHS[arch] if isinstance(arch, str) else arch
        dims = cfg['dims']
        self.patch_embed1 = RefPatchEmbed(dims[0])
        for i in range(2, 5):
            setattr(self, f'patch_embed{i}', RefMerge(dims[i - 2], dims[i - 1]))
        for i in range(1, 5):
            side = img // 4 // 2**(i - 1)
            extra = 1 if i == 4 else 0
            setattr(self, f'pos_embed{i}',
                    nn.Parameter(torch.randn(1, side * side + extra, dims[i - 1]) * 0.02))
            setattr(self, f'block{i}', nn.ModuleList(
                RefBlock(dims[i - 1], cfg['heads'][i - 1], cfg['ratios'][i - 1], has_msa[i - 1],
                         1e-6) for _ in range(cfg['depths'][i - 1])))
        if imagenet:
            self.norm = nn.LayerNorm(dims[3], eps=1e-6)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dims[3]))
            self.head = nn.Linear(dims[3], 1000)

    def forward(self, img):
        x = self.patch_embed1.proj(img)  # floors sizes that are not multiples of 4
        b = x.shape[0]
        outs = []
        for i in range(1, 5):
            if i > 1:
                x = getattr(self, f'patch_embed{i}')(x)
            h, w = x.shape[2:]
            x = x.flatten(2).transpose(1, 2)
            if i == 1:
                x = self.patch_embed1.norm(x)
            pos = getattr(self, f'pos_embed{i}')
            pos = pos[:, 1:] if i == 4 else pos
            side = math.isqrt(pos.shape[1])
            pos = pos.transpose(1, 2).reshape(1, -1, side, side)
            x = x + F.interpolate(pos, size=(h, w), mode='bilinear').flatten(2).transpose(1, 2)
            for blk in getattr(self, f'block{i}'):
                x = blk(x, h, w)
            x = x.transpose(1, 2).reshape(b, -1, h, w)
            outs.append(x)
        return outs


def randomize_(model, offset_std=0.3):
    """Random weights everywhere, non-zero offsets and BN statistics, deterministic."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if 'conv_offset' in name:
                scale = offset_std / math.sqrt(param[0].numel()) if param.dim() > 1 else 0.1
            elif name.endswith('weight') and param.dim() == 1:  # norms: around 1
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen))
                continue
            else:
                scale = 0.02 if 'table' in name or 'pos_embed' in name else (
                    1 / math.sqrt(param[0].numel()) if param.dim() > 1 else 0.05)
            param.copy_(scale * torch.randn(param.shape, generator=gen))
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=gen))
                module.running_var.copy_(1 + torch.rand(module.num_features, generator=gen))
    return model.eval()


def max_rel_error(ours, ref):
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, ref))


def assert_faithful(ours, ref, sizes):
    for size in sizes:
        img = torch.randn(2, 3, *size)
        with torch.no_grad():
            error = max_rel_error(ours(img), ref(img))
        assert error < 1e-4, (size, error)


def load_ours(tmp_path, state_dict, name='ckpt.pth', **kwargs):
    path = tmp_path / name
    torch.save(state_dict, path)
    model = LIT(init_cfg=dict(type='Pretrained', checkpoint=str(path)), **kwargs)
    model.init_weights()
    return model.eval()


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize('arch', ['tiny', 'small', 'medium', 'base'])
def test_official_imagenet_layout_matches_published_counts(arch):
    with torch.device('meta'):
        ref = RefLITTi(imagenet=True) if arch == 'tiny' else RefLIT(arch, 224, imagenet=True)
    without_head = count(ref) - ref.head.weight.numel() - ref.head.bias.numel()
    assert without_head == PUBLISHED_WITHOUT_HEAD[arch]


def test_faithful_to_dense_lit_s_coco_backbone(tmp_path):
    torch.manual_seed(0)
    ref = randomize_(RefLIT('small', table_img=800))
    detector = {f'backbone.{k}': v for k, v in ref.state_dict().items()}
    detector['neck.lateral_convs.0.conv.weight'] = torch.zeros(1)
    ours = load_ours(tmp_path, {'state_dict': detector, 'meta': {}}, arch='small',
                     pretrain_img_size=800)
    assert count(ours) == count(ref)
    assert_faithful(ours, ref, [(64, 96), (70, 90)])


def test_faithful_to_dense_lit_ti_backbone(tmp_path):
    torch.manual_seed(0)
    ref = randomize_(RefLITTi('tiny'))
    ours = load_ours(tmp_path, {'state_dict': ref.state_dict()}, arch='tiny')
    # The authors' dense LIT-Ti keeps an unused class-token row in pos_embed4.
    assert count(ours) == count(ref) - 512
    assert_faithful(ours, ref, [(64, 64), (96, 128)])


def test_faithful_segmentation_variant_norms_every_stage(tmp_path):
    arch = dict(dims=(32, 64, 96, 128), depths=(1, 1, 2, 1), heads=(1, 2, 3, 4),
                ratios=(4, 4, 4, 4))
    ref = randomize_(RefLIT(arch, table_img=512, norm_indices=(0, 1, 2, 3)))
    ours = load_ours(
        tmp_path, ref.state_dict(), pretrain_img_size=512, out_norms=(0, 1, 2, 3),
        arch=dict(embed_dims=(32, 64, 96, 128), depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4),
                  mlp_ratios=(4, 4, 4, 4)))
    assert_faithful(ours, ref, [(67, 131)])


def test_imagenet_weights_give_the_dense_reference_outputs(tmp_path):
    """ImageNet release -> ours equals the authors' dense backbone initialised from it (their
    loader bicubically resizes the tables to 800-sized ones; output norms start at 1/0)."""
    arch = dict(dims=(32, 64, 96, 128), depths=(1, 1, 2, 1), heads=(1, 2, 3, 4),
                ratios=(4, 4, 4, 4))
    imagenet = randomize_(RefLIT(arch, table_img=224, imagenet=True))
    dense = RefLIT(arch, table_img=800).eval()
    state = {k: v for k, v in imagenet.state_dict().items()
             if not k.startswith(('head', 'norm.')) and 'relative_position_index' not in k}
    for key, value in list(state.items()):
        if key.endswith('relative_position_bias_table'):
            side, target = math.isqrt(value.shape[0]), dense.state_dict()[key].shape[0]
            grid = value.t().reshape(1, -1, side, side)
            grid = F.interpolate(grid, size=(math.isqrt(target), ) * 2, mode='bicubic')
            state[key] = grid.reshape(value.shape[1], -1).t()
    missing = dense.load_state_dict(state, strict=False).missing_keys
    assert sorted(missing) == sorted(f'norm{i}.{p}' for i in (1, 2, 3)
                                     for p in ('weight', 'bias'))
    ours = load_ours(tmp_path, {'model': imagenet.state_dict()}, pretrain_img_size=800,
                     out_norms=(1, 2, 3),
                     arch=dict(embed_dims=(32, 64, 96, 128), depths=(1, 1, 2, 1),
                               num_heads=(1, 2, 3, 4), mlp_ratios=(4, 4, 4, 4)))
    assert_faithful(ours, dense, [(64, 64)])
