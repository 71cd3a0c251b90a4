"""Exactness of the dispatch-level FLOP counter on hand-computed cases."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from measure import counting_flops, measure_complexity
from measure.flops import uncounted_modules
from mmsparsevit.models.layers import DeformableTokenMerging
from mmsparsevit.models.layers.knn_attention import knn_attention


class SoftmaxAttention(nn.Module):
    """Plain multi-head self-attention on (B, N, C) tokens, optionally fused."""

    def __init__(self, dims: int, heads: int, fused: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.fused = fused
        self.qkv = nn.Linear(dims, 3 * dims)
        self.proj = nn.Linear(dims, dims)

    def forward(self, x):
        batch, tokens, dims = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dims // self.heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)
        if self.fused:
            out = F.scaled_dot_product_attention(query, key, value)
        else:
            attn = (query @ key.transpose(-2, -1)) * query.shape[-1]**-0.5
            out = attn.softmax(dim=-1) @ value
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dims))


class LinearAttention(nn.Module):
    """Kernelised linear attention written with einsum: (K^T V) first, then Q (K^T V)."""

    def forward(self, x):
        query, key, value = F.elu(x) + 1, F.elu(x) + 1, x
        context = torch.einsum('bnd,bne->bde', key, value)
        return torch.einsum('bnd,bde->bne', query, context)


class GatherTopkAttention(nn.Module):
    """k-NN attention written with a gather: each query mixes its k best keys' values."""

    def __init__(self, topk: int) -> None:
        super().__init__()
        self.topk = topk

    def forward(self, x):
        logits = x @ x.transpose(-2, -1)
        top_logits, index = logits.topk(self.topk, dim=-1)
        batch, tokens, dims = x.shape
        gathered = torch.gather(
            x.unsqueeze(1).expand(batch, tokens, tokens, dims), 2,
            index.unsqueeze(-1).expand(batch, tokens, self.topk, dims))
        return torch.einsum('bnk,bnkd->bnd', top_logits.softmax(dim=-1), gathered)


def count(model, *inputs, convention='products'):
    with torch.no_grad(), counting_flops(model, convention) as counter:
        model(*inputs)
    return counter


@pytest.mark.parametrize('fused', [False, True])
def test_softmax_attention_products_exact(fused):
    batch, tokens, dims, heads = 2, 10, 16, 4
    counter = count(SoftmaxAttention(dims, heads, fused), torch.randn(batch, tokens, dims))
    projections = batch * tokens * dims * 3 * dims + batch * tokens * dims * dims
    # q @ k^T and attn @ v: each B * heads * N * N * head_dim multiply-adds
    attention = 2 * batch * heads * tokens * tokens * (dims // heads)
    assert counter.total == projections + attention
    assert counter.by_module['qkv'] == batch * tokens * dims * 3 * dims
    assert counter.by_module[''] == counter.total


def test_linear_attention_products_exact_and_linear_in_tokens():
    dims = 8
    small = count(LinearAttention(), torch.randn(1, 50, dims)).total
    assert small == 2 * 50 * dims * dims
    assert count(LinearAttention(), torch.randn(1, 200, dims)).total == 4 * small


def test_gather_based_knn_products_exact():
    batch, tokens, dims, topk = 2, 12, 8, 5
    counter = count(GatherTopkAttention(topk), torch.randn(batch, tokens, dims))
    assert counter.total == batch * tokens * tokens * dims + batch * tokens * topk * dims


def test_convolutions_exact():
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4)
    deconv = nn.ConvTranspose2d(12, 6, 2, stride=2)
    model = nn.Sequential(conv, deconv)
    counter = count(model, torch.randn(2, 8, 16, 16))
    conv_flops = 2 * 12 * 8 * 8 * (8 // 4) * 9
    deconv_flops = 2 * 12 * 8 * 8 * 6 * 4
    assert counter.by_module['0'] == conv_flops
    assert counter.by_module['1'] == deconv_flops
    assert counter.total == conv_flops + deconv_flops


def test_torchvision_deform_conv_counted():
    from torchvision.ops import DeformConv2d
    layer = DeformConv2d(4, 6, 2, stride=2)
    counter = count(layer, torch.randn(1, 4, 8, 8), torch.randn(1, 8, 4, 4))
    assert counter.by_op == {'deform_conv2d': 6 * 4 * 4 * 4 * 4}


def test_dtm_counted_as_convs_also_on_meta():
    dtm = DeformableTokenMerging(3, 10).eval()
    offsets = 8 * 4 * 4 * 3 * 4  # conv_offset: 2 x 2 taps, (dy, dx) each
    deform = 10 * 4 * 4 * 3 * 4  # as a 2 x 2, stride-2 convolution with the same output
    meta = measure_complexity(dtm, (8, 8))
    real = measure_complexity(dtm, (8, 8), use_meta=False)
    assert (meta.device, real.device) == ('meta', 'cpu')
    assert meta.by_op == real.by_op == {'convolution': offsets, 'deform_conv2d': deform}
    assert meta.by_module == {'': offsets + deform, 'conv_offset': offsets}


def test_mmcv_deform_convs_are_named_as_uncounted():
    ops = pytest.importorskip('mmcv.ops')
    model = nn.Sequential(nn.Conv2d(3, 3, 1), ops.ModulatedDeformConv2dPack(3, 10, 3, padding=1))
    assert uncounted_modules(model) == ['1'] and uncounted_modules(nn.Linear(2, 2)) == []
    result = measure_complexity(model.eval(), (8, 8), use_meta=False)
    # the 1 x 1 conv and the Pack's offset-and-mask conv (27 channels) are seen; mmcv's
    # deformable product is a pybind call no dispatcher mode sees
    assert result.by_op == {'convolution': 3 * 8 * 8 * 3 + 27 * 8 * 8 * 3 * 9}


def test_knn_attention_counts_on_meta_without_autocast_state():

    class KnnAttention(nn.Module):

        def forward(self, x):
            tokens = x.flatten(2).transpose(1, 2)
            return knn_attention(tokens, tokens, tokens, topk=4)

    meta = measure_complexity(KnnAttention(), (4, 4))
    real = measure_complexity(KnnAttention(), (4, 4), use_meta=False)
    assert meta.device == 'meta' and meta.flops == real.flops > 0


def test_counting_replaces_no_global():
    seen = []

    class Probe(nn.Module):

        def forward(self, x):
            seen.append((torch.autocast, torch.is_autocast_enabled))
            return x

    originals = (torch.autocast, torch.is_autocast_enabled)
    assert measure_complexity(Probe(), (4, 4)).device == 'meta'
    assert seen == [originals]


def test_scaling_with_input_size():
    convnet = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1))
    small = measure_complexity(convnet, (16, 16)).flops
    assert measure_complexity(convnet, (32, 32)).flops == 4 * small
    attention = SoftmaxAttention(16, 2)
    tokens_small = count(attention, torch.randn(1, 64, 16)).total
    tokens_large = count(attention, torch.randn(1, 256, 16)).total
    assert tokens_large > 4.5 * tokens_small


def test_meta_pass_equals_real_pass_and_falls_back():

    class ValueDependent(nn.Module):

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 3)

        def forward(self, x):
            if x.sum().item() > -1e9:  # needs values: impossible on meta
                x = x.flatten(2).transpose(1, 2)
            return self.linear(x)

    convnet = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    convnet(torch.randn(1, 3, 12, 12))
    meta = measure_complexity(convnet, (12, 12))
    real = measure_complexity(convnet, (12, 12), use_meta=False)
    assert (meta.device, real.device) == ('meta', 'cpu')
    assert meta.flops == real.flops == 4 * 10 * 10 * 3 * 9 + 400 * 5
    fallback = measure_complexity(ValueDependent(), (4, 4))
    assert fallback.device == 'cpu' and fallback.flops == 16 * 3 * 3


def test_fvcore_convention_matches_mmengine_flop_analyzer():
    from mmengine.analysis import FlopAnalyzer

    class Mixed(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.gn = nn.GroupNorm(2, 8)
            self.ln = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            x = self.gn(self.bn(self.conv(x)))
            x = F.interpolate(x, scale_factor=2, mode='bilinear')
            x = F.interpolate(x, scale_factor=2, mode='nearest')
            tokens = self.ln(x.flatten(2).transpose(1, 2))
            mixed = tokens.transpose(1, 2) @ tokens
            return self.fc(tokens).sum() + mixed.sum()

    model = Mixed().eval()
    x = torch.randn(1, 3, 8, 8)
    reference = FlopAnalyzer(model, (x, )).unsupported_ops_warnings(False).total()
    assert count(model, x, convention='fvcore').total == reference
    assert count(model, x).total < reference


def test_invalid_convention_is_refused():
    with pytest.raises(ValueError, match='convention'):
        with counting_flops(convention='macs'):
            pass
