"""KVT: conversion keeps the inner backbone's parameter objects and keys, plain outputs at
full k, exact k-NN semantics inside each replacement module, Twins' padded windows, init_cfg,
bad input."""
import copy
import functools
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from mmengine.config import ConfigDict

from mmsparsevit.models.backbones.kvt import SUPPORTED_BACKBONES, convert_to_knn_attention
from mmsparsevit.models.layers.knn_attention import resolve_topk
from mmsparsevit.models.layers.knn_attention_modules import (KNNLITAttention,
                                                             KNNLocallyGroupedSelfAttention,
                                                             KNNMultiheadAttention, KNNWindowMSA)
from mmsparsevit.registry import MODELS
from test_knn_attention import reference_knn_attention  # sibling test module

pytest.importorskip('mmdet')
pytest.importorskip('mmseg')

# Small custom archs: one block per stage (two in Swin's first stage so that shifted windows
# and their mask are exercised), 32 channels, so that 511 x 511 inputs stay fast.
SWIN = dict(embed_dims=32, depths=(2, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=7,
            drop_path_rate=0.)
PYRAMID = dict(embed_dims=32, num_layers=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
               drop_path_rate=0.)
# SVT needs two blocks per stage: LSA (7x7 windows) then global sub-sampled attention.
TWINS = dict(embed_dims=[32, 32, 32, 32], num_heads=[1, 1, 2, 2], mlp_ratios=[2, 2, 2, 2],
             sr_ratios=[8, 4, 2, 1], qkv_bias=True, drop_path_rate=0.)
BACKBONES = {
    'mmdet.SwinTransformer': dict(type='mmdet.SwinTransformer', **SWIN),
    'mmseg.SwinTransformer': dict(type='mmseg.SwinTransformer', **SWIN),
    'mmdet.PyramidVisionTransformer': dict(type='mmdet.PyramidVisionTransformer', **PYRAMID),
    'mmdet.PyramidVisionTransformerV2': dict(type='mmdet.PyramidVisionTransformerV2',
                                             **PYRAMID),
    'mmseg.MixVisionTransformer': dict(type='mmseg.MixVisionTransformer', **PYRAMID),
    'mmseg.PCPVT': dict(type='mmseg.PCPVT', depths=[1, 1, 1, 1], **TWINS),
    'mmseg.SVT': dict(type='mmseg.SVT', depths=[2, 2, 2, 2], windiow_sizes=[7, 7, 7, 7],
                      **TWINS),
    'mmsparsevit.LIT': dict(
        type='mmsparsevit.LIT',
        arch=dict(embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                  mlp_ratios=(2, 2, 2, 2)),
        drop_path_rate=0.),
}
# Converted attention modules expected per backbone (Swin and SVT: one per block).
NUM_ATTENTIONS = {name: 5 if 'Swin' in name else 2 if 'LIT' in name else 8 if 'SVT' in name
                  else 4 for name in BACKBONES}
KNN_CLASSES = (KNNWindowMSA, KNNMultiheadAttention, KNNLITAttention,
               KNNLocallyGroupedSelfAttention)


def build_pair(name, topk, seed=0):
    """A plain backbone and a KVT-wrapped one holding the same weights."""
    torch.manual_seed(seed)
    plain = MODELS.build(copy.deepcopy(BACKBONES[name]))
    plain.init_weights()
    # Random (not zero) relative-position tables so that the bias matters.
    with torch.no_grad():
        for key, param in plain.named_parameters():
            if 'relative_position_bias_table' in key:
                param.normal_(std=0.5)
    wrapped = MODELS.build(
        dict(type='mmsparsevit.KVT', topk=topk, backbone=copy.deepcopy(BACKBONES[name])))
    wrapped.load_state_dict(plain.state_dict(), strict=True)
    # mmdet's Swin overrides train() without returning self, so eval() gives None.
    plain.eval()
    wrapped.eval()
    return plain, wrapped


def knn_modules(model):
    return [m for m in model.modules() if isinstance(m, KNN_CLASSES)]


@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_same_parameters_and_state_dict_keys(name):
    torch.manual_seed(0)
    plain = MODELS.build(copy.deepcopy(BACKBONES[name]))
    wrapped = MODELS.build(
        dict(type='mmsparsevit.KVT', topk=0.5, backbone=copy.deepcopy(BACKBONES[name])))
    assert type(wrapped) is type(plain)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    assert [(k, p.shape) for k, p in wrapped.named_parameters()] == \
        [(k, p.shape) for k, p in plain.named_parameters()]
    assert sum(p.numel() for p in wrapped.parameters()) == \
        sum(p.numel() for p in plain.parameters())
    assert len(knn_modules(wrapped)) == NUM_ATTENTIONS[name]
    assert not knn_modules(plain)


def qualified_names(model):
    return {f'{type(m).__module__}.{type(m).__qualname__}' for m in model.modules()}


@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_conversion_replaces_modules_and_keeps_the_same_tensors(name):
    torch.manual_seed(0)
    model = MODELS.build(copy.deepcopy(BACKBONES[name]))
    model.eval()
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    keys = list(model.state_dict())
    # Built before the conversion: it must still optimise the converted model's tensors.
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    replaced = SUPPORTED_BACKBONES[f'{type(model).__module__}.{type(model).__qualname__}']
    assert set(replaced.replacements) <= qualified_names(model)

    assert convert_to_knn_attention(model, topk=0.5) is model
    assert not set(replaced.replacements) & qualified_names(model)
    assert len(knn_modules(model)) == NUM_ATTENTIONS[name]
    assert list(model.state_dict()) == keys
    assert list(dict(model.named_parameters())) == list(params)
    assert all(param is params[key] for key, param in model.named_parameters())
    assert all(buffer is buffers[key] for key, buffer in model.named_buffers())
    # Converted in eval mode, the replacements are in eval mode too (no attention dropout).
    assert not any(m.training for m in knn_modules(model))
    optimized = [param for group in optimizer.param_groups for param in group['params']]
    assert len(optimized) == len(params)
    assert all(a is b for a, b in zip(optimized, model.parameters()))


def image_size(name, size):
    """``size``, but one where mmseg's LSA masks its padding for SVT.

    mmseg's LSA lets real tokens attend to its zero padding where a map is padded at one
    edge only (its mask covers the two-edge case); KVT masks padding always. 112 x 137 gives
    SVT such a map in stage 2 (14 x 18 tokens, 7 x 7 windows), so SVT is compared with mmseg
    at 116 x 150 (padding at both edges in every stage) and, at 112 x 137, with mmseg's model
    with padding masked in test_svt_never_attends_to_padding_where_mmseg_does.
    """
    return (116, 150) if name == 'mmseg.SVT' and size == (112, 137) else size


@pytest.mark.parametrize('name', sorted(BACKBONES))
@pytest.mark.parametrize('size', [(33, 33), (112, 137), (511, 511)])
def test_full_topk_reproduces_plain_backbone(name, size):
    plain, wrapped = build_pair(name, topk=1.0)
    image = torch.randn(1, 3, *image_size(name, size))
    with torch.no_grad():
        expected, outs = plain(image), wrapped(image)
    assert len(outs) == len(expected)
    for out, ref in zip(outs, expected):
        assert out.shape == ref.shape
        # float32 through a whole backbone; the k-NN kernel sums its chunked softmax in
        # another order than the dense attention: measured 4.3e-6 on outputs up to ~5 (7
        # eps of the largest), so atol 1e-5 (rtol only adds on larger values).
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_large_int_topk_reproduces_plain_and_small_topk_changes_output(name):
    image = torch.randn(1, 3, *image_size(name, (112, 137)))
    plain, wrapped = build_pair(name, topk=10**6)
    _, sparse = build_pair(name, topk=3)
    with torch.no_grad():
        expected, full, changed = plain(image), wrapped(image), sparse(image)
    for out, ref in zip(full, expected):
        # As above.
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # k = 3 changes the output by far more than the round-off above.
    assert not torch.allclose(changed[-1], expected[-1], rtol=1e-3, atol=1e-3)


def reference_topk_attention(query, key, value, topk, scale, bias=None, allowed=None):
    return reference_knn_attention(query, key, value, resolve_topk(topk, key.shape[-2]), scale,
                                   bias, allowed)


@pytest.mark.parametrize('toolbox', ['mmdet', 'mmseg'])
def test_window_attention_semantics_with_shift_mask(toolbox):
    _, model = build_pair(f'{toolbox}.SwinTransformer', topk=10)
    attn = model.stages[0].blocks[1].attn.w_msa
    assert type(attn) is KNNWindowMSA
    torch.manual_seed(1)
    num_windows, batch, tokens, channels = 4, 2, 49, 32
    x = torch.randn(num_windows * batch, tokens, channels)
    # Shift-style mask: 0 allowed, -100 forbidden; every query may see itself.
    mask = torch.where(torch.rand(num_windows, tokens, tokens) > 0.5, 0., -100.)
    mask.diagonal(dim1=1, dim2=2).zero_()
    with torch.no_grad():
        out = attn(x, mask=mask)
        heads = attn.num_heads
        qkv = attn.qkv(x).reshape(batch * num_windows, tokens, 3, heads,
                                  channels // heads).permute(2, 0, 3, 1, 4)
        bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)]
        bias = bias.view(tokens, tokens, heads).permute(2, 0, 1)
        query, key, value = (t.reshape(batch, num_windows, heads, tokens, -1) for t in qkv)
        ref = reference_topk_attention(query, key, value, 10, attn.scale, bias,
                                       (mask == 0).unsqueeze(1))
        ref = attn.proj(ref.reshape(batch * num_windows, heads, tokens,
                                    -1).transpose(1, 2).reshape(-1, tokens, channels))
    # float32, one module, the reference sums in another order: measured 4e-9 (2e-7 of the
    # largest value); atol 1e-6 is 5 eps of values of order 1.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', ['mmdet.PyramidVisionTransformerV2',
                                  'mmseg.MixVisionTransformer', 'mmseg.PCPVT', 'mmseg.SVT'])
def test_multihead_attention_semantics(name):
    _, model = build_pair(name, topk=0.25)
    # The nn.MultiheadAttention of the first stage's (first global) attention block.
    block = model.layers[0][1] if 'Transformer' in name else model.layers[0]
    attn = block[1 if name == 'mmseg.SVT' else 0].attn.attn
    assert type(attn) is KNNMultiheadAttention
    torch.manual_seed(2)
    query, key = torch.randn(40, 2, 32), torch.randn(13, 2, 32)  # sequence first
    with torch.no_grad():
        out, weights = attn(query=query, key=key, value=key)
        projected = [nn.functional.linear(t.transpose(0, 1), w, b).reshape(2, -1, 1, 32)
                     .transpose(1, 2) for t, w, b in zip(
                         (query, key, key), attn.in_proj_weight.chunk(3),
                         attn.in_proj_bias.chunk(3))]
        ref = reference_topk_attention(*projected, 0.25, 32**-0.5)
        ref = attn.out_proj(ref.transpose(1, 2).reshape(2, 40, 32)).transpose(0, 1)
    assert weights is None
    # As in the Swin window case: measured 7e-8.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_lit_attention_semantics_with_relative_bias():
    _, model = build_pair('mmsparsevit.LIT', topk=7)
    attn = model.stages[2].blocks[0].attn
    assert type(attn) is KNNLITAttention
    torch.manual_seed(3)
    x = torch.randn(2, 30, 32)
    with torch.no_grad():
        out = attn(x, (5, 6))
        qkv = attn.qkv(x).reshape(2, 30, 3, 2, 16).permute(2, 0, 3, 1, 4)
        ref = reference_topk_attention(*qkv, 7, attn.scale,
                                       attn.relative_position_bias((5, 6)))
        ref = attn.proj(ref.transpose(1, 2).reshape(2, 30, 32))
    # As in the Swin window case: measured 4e-9.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def reference_lsa(attn, x, hw_shape, topk):
    """Twins' LSA window by window, over the real tokens of each window only.

    Nothing is padded, so nothing padded can be attended to; ``topk`` as a fraction counts
    the ``window_size ** 2`` keys of a whole window, as KVT does.
    """
    batch, _, channels = x.shape
    height, width = hw_shape
    size = attn.window_size
    grid = x.reshape(batch, height, width, channels)
    out = torch.empty_like(grid)
    for top in range(0, height, size):
        for left in range(0, width, size):
            window = grid[:, top:top + size, left:left + size]
            rows, cols = window.shape[1:3]
            qkv = attn.qkv(window.reshape(batch, rows * cols, channels))
            query, key, value = qkv.reshape(batch, rows * cols, 3, attn.num_heads,
                                            -1).permute(2, 0, 3, 1, 4)
            attended = reference_knn_attention(query, key, value,
                                               resolve_topk(topk, size * size), attn.scale)
            out[:, top:top + size, left:left + size] = attended.transpose(1, 2).reshape(
                batch, rows, cols, channels)
    return attn.proj(out.reshape(batch, height * width, channels))


# Windows of 7: no padding, padding at both edges, at the right only, at the bottom only.
@pytest.mark.parametrize('hw_shape', [(14, 14), (12, 12), (14, 18), (12, 14)])
@pytest.mark.parametrize('topk', [10, 0.3, 49])
def test_locally_grouped_attention_semantics_with_padding(hw_shape, topk):
    _, model = build_pair('mmseg.SVT', topk=topk)
    attn = model.layers[2][0].attn.double()
    assert type(attn) is KNNLocallyGroupedSelfAttention and attn.num_heads == 2
    torch.manual_seed(4)
    x = torch.randn(2, hw_shape[0] * hw_shape[1], 32, dtype=torch.float64)
    with torch.no_grad():
        out, ref = attn(x, hw_shape), reference_lsa(attn, x, hw_shape, topk)
    # Float64 and no ties among random logits: the same keys, round-off apart (measured
    # 9e-18; float64 eps 2.2e-16 times sums of fewer than 100 terms stays below 1e-13).
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_svt_never_attends_to_padding_where_mmseg_does():
    # Stage 2 of a 112 x 137 input has 14 x 18 tokens, padded at the right edge only, where
    # mmseg's LSA mask allows the zero padding (see image_size).
    plain, wrapped = build_pair('mmseg.SVT', topk=1.0)
    image = torch.randn(1, 3, 112, 137)
    with torch.no_grad():
        mmseg_outs = plain(image)
        for layer in plain.layers:
            layer[0].attn.forward = functools.partial(reference_lsa, layer[0].attn, topk=49)
        expected, outs = plain(image), wrapped(image)
    for out, ref in zip(outs, expected):
        # float32 through the backbone, as in test_full_topk_reproduces_plain_backbone
        # (measured 1e-6).
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Stage 1 (28 x 35 tokens) needs no padding; stage 2 on differ from mmseg's output.
    torch.testing.assert_close(outs[0], mmseg_outs[0], rtol=1e-5, atol=1e-5)
    # Padded windows differ by far more than round-off.
    assert not torch.allclose(outs[1], mmseg_outs[1], rtol=1e-3, atol=1e-3)


def test_per_stage_topk_and_training_backward():
    model = MODELS.build(dict(type='mmsparsevit.KVT', topk=[1.0, 0.5, 20, 3],
                              backbone=copy.deepcopy(BACKBONES['mmdet.SwinTransformer'])))
    per_stage = [[m.knn_topk for m in knn_modules(stage)] for stage in model.stages]
    assert per_stage == [[1.0, 1.0], [0.5], [20], [3]]
    assert 'knn_topk=0.5' in repr(model.stages[1])
    model.train()
    sum(out.sum() for out in model(torch.randn(2, 3, 64, 64))).backward()
    # Stage 0 runs the dense path (topk covers its windows), stage 2 the k-NN function.
    for stage in (0, 2):
        table = model.stages[stage].blocks[0].attn.w_msa.relative_position_bias_table
        assert table.grad is not None and table.grad.abs().sum() > 0


def test_svt_training_backward_with_padded_windows():
    model = MODELS.build(dict(type='mmsparsevit.KVT', topk=10,
                              backbone=copy.deepcopy(BACKBONES['mmseg.SVT'])))
    model.train()
    torch.manual_seed(5)
    # 40 x 52: stage 1 has 10 x 13 tokens, padded at both edges of its 7 x 7 windows. Random
    # output weights: a plain sum has no gradient through SVT's per-stage LayerNorm.
    outs = model(torch.randn(2, 3, 40, 52))
    sum((out * torch.randn_like(out)).sum() for out in outs).backward()
    assert all(param.grad is not None and param.grad.abs().sum() > 0
               for key, param in model.named_parameters() if 'attn' in key)


def test_frozen_stages_stay_frozen():
    model = MODELS.build(dict(type='mmsparsevit.KVT', topk=0.5, backbone=dict(
        BACKBONES['mmdet.SwinTransformer'], frozen_stages=1)))
    model.train()
    assert not any(p.requires_grad for p in model.stages[0].parameters())
    assert all(p.requires_grad for p in model.stages[1].parameters())
    assert [m.training for m in knn_modules(model)] == [False, False, True, True, True]


def test_importing_mmsparsevit_does_not_import_the_toolboxes():
    code = ('import sys, mmsparsevit.models; '
            'assert not {"mmdet", "mmseg", "timm"} & set(sys.modules), sorted(sys.modules)')
    subprocess.run([sys.executable, '-c', code], check=True, timeout=120)


def test_init_cfg_of_inner_backbone_loads_checkpoint(tmp_path):
    torch.manual_seed(0)
    source = MODELS.build(copy.deepcopy(BACKBONES['mmdet.SwinTransformer']))
    checkpoint = tmp_path / 'swin.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in source.state_dict().items()}},
               checkpoint)
    # As in a config file (mmdet's Swin reads init_cfg.checkpoint as an attribute).
    backbone = ConfigDict(BACKBONES['mmdet.SwinTransformer'],
                          init_cfg=dict(type='Pretrained', checkpoint=str(checkpoint)))
    torch.manual_seed(1)
    model = MODELS.build(dict(type='mmsparsevit.KVT', topk=0.5, backbone=backbone))
    model.init_weights()
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_built_from_mmdet_scope_and_pickles():
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MMDET_MODELS.build(dict(
            type='mmsparsevit.KVT', topk=0.5,
            backbone=dict(BACKBONES['mmdet.SwinTransformer'], type='SwinTransformer')))
    assert len(knn_modules(model)) == 5
    image = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        expected = model(image)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            for out, ref in zip(clone(image), expected):
                torch.testing.assert_close(out, ref, rtol=0, atol=0)


def build_kvt(topk, backbone=None):
    backbone = backbone or copy.deepcopy(BACKBONES['mmdet.SwinTransformer'])
    return MODELS.build(dict(type='mmsparsevit.KVT', topk=topk, backbone=backbone))


@pytest.mark.parametrize('topk,error,match', [
    (0, ValueError, 'positive'),
    (-2, ValueError, 'positive'),
    (1.5, ValueError, r'\(0, 1\]'),
    ([0.5, 0.5, 0.5], ValueError, 'needs 4 entries'),
    ([0.5, 0.5, 0.5, 0], ValueError, r'topk\[3\]'),
    ('half', TypeError, 'int or a float'),
])
def test_bad_topk(topk, error, match):
    with pytest.raises(error, match=match):
        build_kvt(topk)


def test_unsupported_backbone_lists_supported_ones():
    with pytest.raises(TypeError, match='mmdet.ResNet.*supported: mmdet.SwinTransformer') as error:
        build_kvt(0.5, dict(type='mmdet.ResNet', depth=18))
    assert all(supported in str(error.value) for supported in BACKBONES)
    with pytest.raises(KeyError, match='not registered'):
        build_kvt(0.5, dict(type='mmdet.NoSuchBackbone'))
    with pytest.raises(TypeError, match='KVT does not support the backbone'):
        convert_to_knn_attention(nn.Linear(2, 2), 0.5)
    with pytest.raises(TypeError, match='config dict'):
        build_kvt(0.5, 'mmdet.SwinTransformer')


@pytest.mark.parametrize('name', ['mmdet.SwinTransformer', 'mmseg.SwinTransformer'])
@pytest.mark.parametrize('size', [(36, 44), (60, 92)])
@pytest.mark.parametrize('topk', [5, 20, 0.5])
def test_swin_at_k_below_n_equals_the_tie_rule_reference_where_windows_pad(name, size, topk):
    """Whole-model KVT-Swin against an independent reference of the documented tie rule (every
    key at or above the k-th largest logit is kept), at sizes where Swin pads its 7x7 windows
    (36x44: 9x11 tokens in 14x14 windows; 60x92: 15x23 in 21x28). The relative-position
    tables are zeroed so that the zero-padded keys of a window give exactly tied logits."""
    from transcriptions import plain_knn_backbone, threshold_knn_attention
    _, wrapped = build_pair(name, topk=topk)
    with torch.no_grad():
        for key, param in wrapped.named_parameters():
            if 'relative_position_bias_table' in key:
                param.zero_()
    wrapped = wrapped.double()
    reference = plain_knn_backbone(copy.deepcopy(wrapped), attention=threshold_knn_attention)
    # The authors' formulation keeps exactly k keys (torch.topk), dropping some tied ones.
    exactly_k = plain_knn_backbone(copy.deepcopy(wrapped))
    image = torch.randn(1, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        outs, expected, untied = wrapped(image), reference(image), exactly_k(image)
    for out, ref in zip(outs, expected):
        # float64 end to end: only summation order separates the two (measured 3.4e-15 on
        # outputs of order 1).
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # The ties are real: choosing exactly k of them changes the output.
    assert max((out - other).abs().max() for out, other in zip(outs, untied)) > 1e-3
