"""VVT as the authors' ``vvt.py`` computes it (OpenNLPLab/Vicinity-Vision-Transformer).

Parameter names follow their checkpoints (``patch_embed{i}``, ``block{i}``, ``norm{i}``,
``attn.q_proj`` ... ``attn.se_fc``), so ``convert_vvt_checkpoint`` maps this model's state
dict onto :class:`mmsparsevit.models.VVT`.
"""
import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def bound(t: Tensor) -> Tensor:
    """The authors' magnitude clamp: ``|t|`` kept in [1e-4, 1e4], the sign kept."""
    return torch.sign(t) * torch.clamp(torch.abs(t), 1e-4, 1e4)


class PlainVicinityAttention(nn.Module):
    """Linear attention with the 2-D cos/sin vicinity re-weighting, in the reduced space.

    Args:
        dim (int): Token channels.
        heads (int): Attention heads.
        reduction (int): Channel reduction of q, k, v. Defaults to 2.
    """

    def __init__(self, dim: int, heads: int, reduction: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim // reduction)
        self.k_proj = nn.Linear(dim, dim // reduction)
        self.v_proj = nn.Linear(dim, dim // reduction)
        self.out_proj = nn.Linear(dim // reduction, dim)
        self.se_fc = nn.Sequential(
            nn.Linear(dim, dim, bias=False), nn.ReLU(), nn.Linear(dim, dim, bias=False),
            nn.Sigmoid())

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        batch, tokens, _ = x.shape
        gate = self.se_fc(x.mean(1))

        def per_head(t: Tensor) -> Tensor:
            return t.reshape(batch, tokens, self.heads, -1)

        q = per_head(self.q_proj(x)).relu()
        k = per_head(self.k_proj(x)).relu()
        v = per_head(self.v_proj(x))
        index = torch.arange(tokens, device=x.device)
        row_angle = (index // width).to(x.dtype) * (math.pi / 2) / height
        col_angle = (index % width).to(x.dtype) * (math.pi / 2) / width
        terms = torch.stack(
            [row_angle.cos(), row_angle.sin(), col_angle.cos(), col_angle.sin()], dim=1)
        q_feat = torch.cat([q * terms[:, p, None, None] for p in range(4)], dim=-1)
        k_feat = torch.cat([k * terms[:, p, None, None] for p in range(4)], dim=-1)
        kv = bound(torch.einsum('bnhf,bnhd->bhfd', k_feat, v))
        z = bound(1 / (torch.einsum('bnhf,bhf->bnh', q_feat, k_feat.sum(1)) + 1e-4))
        out = bound(torch.einsum('bnhf,bhfd->bnhd', q_feat, kv))
        out = bound(out * z[..., None])
        out = bound(self.out_proj(out.reshape(batch, tokens, -1)))
        return bound(out + out * gate[:, None, :])


class PlainDWConv(nn.Module):

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        image = x.transpose(1, 2).reshape(x.shape[0], -1, height, width)
        return self.dwconv(image).flatten(2).transpose(1, 2)


class PlainMlp(nn.Module):

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = PlainDWConv(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), height, width)))


class PlainBlock(nn.Module):

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = PlainVicinityAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = PlainMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        x = x + self.attn(self.norm1(x), height, width)
        return x + self.mlp(self.norm2(x), height, width)


class PlainPatchEmbed(nn.Module):

    def __init__(self, in_chans: int, dim: int, patch: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, stride, patch // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tuple[Tensor, int, int]:
        x = self.proj(x)
        height, width = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class PlainVVT(nn.Module):
    """The four-stage VVT pyramid; ``forward`` returns the normalised stage maps.

    Args:
        embed_dims (Sequence[int]): Channels per stage.
        depths (Sequence[int]): Blocks per stage.
        num_heads (Sequence[int]): Attention heads per stage.
        mlp_ratios (Sequence[float]): MLP hidden ratio per stage.
        num_classes (int): Outputs of the classifier head (kept for the checkpoint layout;
            unused by ``forward``). Defaults to 1000.
    """

    def __init__(self,
                 embed_dims: Sequence[int],
                 depths: Sequence[int],
                 num_heads: Sequence[int],
                 mlp_ratios: Sequence[float],
                 num_classes: int = 1000) -> None:
        super().__init__()
        in_chans = 3
        for i, dim in enumerate(embed_dims):
            setattr(self, f'patch_embed{i + 1}',
                    PlainPatchEmbed(in_chans, dim, 7 if i == 0 else 3, 4 if i == 0 else 2))
            setattr(self, f'block{i + 1}', nn.ModuleList(
                [PlainBlock(dim, num_heads[i], mlp_ratios[i]) for _ in range(depths[i])]))
            setattr(self, f'norm{i + 1}', nn.LayerNorm(dim, eps=1e-6))
            in_chans = dim
        self.num_stages = len(embed_dims)
        self.head = nn.Linear(embed_dims[-1], num_classes)

    def forward(self, x: Tensor) -> List[Tensor]:
        outs = []
        for i in range(1, self.num_stages + 1):
            x, height, width = getattr(self, f'patch_embed{i}')(x)
            for block in getattr(self, f'block{i}'):
                x = block(x, height, width)
            x = getattr(self, f'norm{i}')(x)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, height, width)
            outs.append(x)
        return outs
