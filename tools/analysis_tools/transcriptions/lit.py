"""LIT as the authors' dense-prediction and ImageNet code computes it (zhuang-group/LIT).

``PlainLIT`` is the Swin-style LIT-S/M/B (their ``LIT`` backbone, or with
``imagenet=True`` their classifier), ``PlainLITTi`` the PVT-style LIT-Ti. Parameter names
and shapes are the official ones, so the authors' checkpoints, and these models' state
dicts, load into :class:`mmsparsevit.models.LIT` through its converter. Deformable sampling
is torchvision's ``deform_conv2d``; the relative-position bias is gathered with separate
row and column offsets; LIT-Ti floors the patch grid as the authors do.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

LIT_ARCHS: Dict[str, dict] = {
    'tiny': dict(dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), heads=(1, 2, 5, 8),
                 ratios=(8, 8, 4, 4)),
    'small': dict(dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), heads=(3, 6, 12, 24),
                  ratios=(4, 4, 4, 4)),
    'medium': dict(dims=(96, 192, 384, 768), depths=(2, 2, 18, 2), heads=(3, 6, 12, 24),
                   ratios=(4, 4, 4, 4)),
    'base': dict(dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), heads=(4, 8, 16, 32),
                 ratios=(4, 4, 4, 4)),
}


class PlainMlp(nn.Module):

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class PlainDeformConv(nn.Module):
    """Official ``dconv``: weight, bias and a 2x2/stride-2 ``conv_offset``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 2, 2) / math.sqrt(4 * cin))
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)
        self.conv_offset = nn.Conv2d(cin, 8, 2, 2)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        return deform_conv2d(x, self.conv_offset(x), self.weight, self.bias, stride=2)


class PlainTokenMerging(nn.Module):
    """Official DTM container: ``dconv`` + ``norm_layer`` (BN) + GELU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.dconv = PlainDeformConv(cin, cout)
        self.norm_layer = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.norm_layer(self.dconv(x)))


class PlainAttention(nn.Module):
    """Global softmax attention, optionally with a relative-position-bias table made for a
    ``table_hw`` map and resized bicubically to the input map."""

    def __init__(self,
                 dim: int,
                 heads: int,
                 table_hw: Optional[Tuple[int, int]] = None,
                 with_index: bool = False) -> None:
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

    def bias(self, h: int, w: int) -> Tensor:
        th, tw = self.table_hw
        grid = self.relative_position_bias_table.t().reshape(1, self.heads, 2 * th - 1,
                                                             2 * tw - 1)
        grid = F.interpolate(grid, size=(2 * h - 1, 2 * w - 1), mode='bicubic')[0]
        rows = torch.arange(h, device=grid.device).repeat_interleave(w)
        cols = torch.arange(w, device=grid.device).repeat(h)
        dy = rows[:, None] - rows[None, :] + h - 1
        dx = cols[:, None] - cols[None, :] + w - 1
        return grid[:, dy, dx]

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        logits = torch.einsum('bhnd,bhmd->bhnm', q, k) / math.sqrt(c // self.heads)
        if self.table_hw is not None:
            logits = logits + self.bias(h, w)
        out = torch.einsum('bhnm,bhmd->bhnd', logits.softmax(-1), v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class PlainBlock(nn.Module):
    """An MLP block, or (``msa``) an attention + MLP block."""

    def __init__(self,
                 dim: int,
                 heads: int,
                 ratio: float,
                 msa: bool,
                 eps: float,
                 table_hw: Optional[Tuple[int, int]] = None,
                 with_index: bool = False) -> None:
        super().__init__()
        self.msa = msa
        if msa:
            self.norm1 = nn.LayerNorm(dim, eps=eps)
            self.attn = PlainAttention(dim, heads, table_hw, with_index)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = PlainMlp(dim, int(dim * ratio))

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        if self.msa:
            x = x + self.attn(self.norm1(x), h, w)
        return x + self.mlp(self.norm2(x))


class PlainPatchEmbed(nn.Module):

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 4, 4)
        self.norm = nn.LayerNorm(dim)


class PlainLayer(nn.Module):

    def __init__(self, blocks: List[nn.Module], downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        if downsample is not None:
            self.downsample = downsample


class PlainLIT(nn.Module):
    """Swin-style LIT-S/M/B.

    Args:
        arch (str | dict): A key of ``LIT_ARCHS`` or a dict with ``dims``, ``depths``,
            ``heads`` and ``ratios``.
        table_img (int): Input size the relative-position tables are made for (800 in the
            authors' detection backbone, 224 in their ImageNet models). Defaults to 800.
        norm_indices (Sequence[int]): Stages with an output LayerNorm. Defaults to (1, 2, 3).
        imagenet (bool): The ImageNet classifier layout (final norm, head, index buffers,
            no output norms). Defaults to False.
        has_msa (Sequence[int]): Stages with attention. Defaults to (0, 0, 1, 1).
    """

    def __init__(self,
                 arch: Union[str, dict],
                 table_img: int = 800,
                 norm_indices: Sequence[int] = (1, 2, 3),
                 imagenet: bool = False,
                 has_msa: Sequence[int] = (0, 0, 1, 1)) -> None:
        super().__init__()
        cfg = LIT_ARCHS[arch] if isinstance(arch, str) else arch
        dims = cfg['dims']
        self.dims = dims
        self.norm_indices = () if imagenet else tuple(norm_indices)
        self.patch_embed = PlainPatchEmbed(dims[0])
        self.layers = nn.ModuleList()
        for i, depth in enumerate(cfg['depths']):
            side = table_img // 4 // 2**i
            blocks = [
                PlainBlock(dims[i], cfg['heads'][i], cfg['ratios'][i], has_msa[i], 1e-5,
                           (side, side), imagenet) for _ in range(depth)
            ]
            merge = PlainTokenMerging(dims[i], dims[i + 1]) if i < 3 else None
            self.layers.append(PlainLayer(blocks, merge))
        for i in self.norm_indices:
            self.add_module(f'norm{i}', nn.LayerNorm(dims[i]))
        if imagenet:
            self.norm = nn.LayerNorm(dims[3])
            self.head = nn.Linear(dims[3], 1000)

    def forward(self, img: Tensor) -> List[Tensor]:
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


class PlainLITTi(nn.Module):
    """PVT-style LIT-Ti: the authors' ``LIT_Ti`` dense backbone or their ImageNet model.

    Args:
        arch (str | dict): As for :class:`PlainLIT`. Defaults to 'tiny'.
        img (int): Input size the position embeddings are made for. Defaults to 224.
        imagenet (bool): The ImageNet classifier layout. Defaults to False.
        has_msa (Sequence[int]): Stages with attention. Defaults to (0, 0, 1, 1).
    """

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 img: int = 224,
                 imagenet: bool = False,
                 has_msa: Sequence[int] = (0, 0, 1, 1)) -> None:
        super().__init__()
        cfg = LIT_ARCHS[arch] if isinstance(arch, str) else arch
        dims = cfg['dims']
        self.patch_embed1 = PlainPatchEmbed(dims[0])
        for i in range(2, 5):
            setattr(self, f'patch_embed{i}', PlainTokenMerging(dims[i - 2], dims[i - 1]))
        for i in range(1, 5):
            side = img // 4 // 2**(i - 1)
            extra = 1 if i == 4 else 0
            setattr(self, f'pos_embed{i}',
                    nn.Parameter(torch.randn(1, side * side + extra, dims[i - 1]) * 0.02))
            setattr(self, f'block{i}', nn.ModuleList(
                PlainBlock(dims[i - 1], cfg['heads'][i - 1], cfg['ratios'][i - 1],
                           has_msa[i - 1], 1e-6) for _ in range(cfg['depths'][i - 1])))
        if imagenet:
            self.norm = nn.LayerNorm(dims[3], eps=1e-6)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dims[3]))
            self.head = nn.Linear(dims[3], 1000)

    def forward(self, img: Tensor) -> List[Tensor]:
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
