"""KVT on timm's ViT / DeiT, where the paper applies it: the conversion keeps timm's parameter
objects and state-dict keys, a timm checkpoint loads strictly, full k is the plain timm model,
k < N is an independent top-k reference (float64), timm's attention options and masks, and
the registry route through mmseg's TIMMBackbone."""
import copy

import pytest
import torch
import torch.nn as nn

from mmsparsevit.models import convert_to_knn_attention
from mmsparsevit.models.layers.knn_attention import resolve_topk
from mmsparsevit.models.layers.knn_attention_modules import KNNTimmAttention
from mmsparsevit.registry import MODELS as REGISTRY

timm_layers = pytest.importorskip('timm.layers')
timm_vit = pytest.importorskip('timm.models.vision_transformer')
timm_deit = pytest.importorskip('timm.models.deit')

# 4x4 patches of 8 pixels: 16 patch tokens plus the prefix tokens.
ARCH = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
MODELS = {
    # DeiT without distillation is timm's VisionTransformer itself.
    'vit': lambda: timm_vit.VisionTransformer(**ARCH),
    # Class and distillation token, two heads averaged in eval.
    'deit-distilled': lambda: timm_deit.VisionTransformerDistilled(**ARCH),
    # DeiT-III / ViT options: layer scale, q/k norm, register tokens, average pooling.
    'vit-qknorm-reg': lambda: timm_vit.VisionTransformer(
        **ARCH, qk_norm=True, init_values=0.1, reg_tokens=2, global_pool='avg'),
}


def timm_checkpoint(model, path, seed=0):
    """Save a timm-layout state dict of random values, as a released checkpoint would be."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {key: torch.randn(value.shape, generator=generator) * 0.3
                  for key, value in model.state_dict().items()}
    torch.save(state_dict, path)
    return path


def load(model, path):
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    return model.double().eval()


def build_pair(name, topk, tmp_path):
    """The plain timm model and a converted one, both loaded from one timm checkpoint."""
    checkpoint = timm_checkpoint(MODELS[name](), tmp_path / f'{name}.pth')
    plain = load(MODELS[name](), checkpoint)
    converted = load(convert_to_knn_attention(MODELS[name](), topk), checkpoint)
    return plain, converted


def images(seed=1):
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def reference_topk_softmax(logits, topk):
    """Softmax over each row's keys at or above its k-th largest logit (the tie rule)."""
    threshold = logits.topk(resolve_topk(topk, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float('-inf')).softmax(dim=-1)


def reference_forward(attn, topk):
    """timm's ``Attention.forward`` written out, with the softmax over the top-k keys only."""

    def forward(x, attn_mask=None, is_causal=False):
        batch, tokens, _ = x.shape
        query, key, value = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads,
                                                attn.head_dim).permute(2, 0, 3, 1, 4)
        logits = attn.q_norm(query) * attn.scale @ attn.k_norm(key).transpose(-2, -1)
        if is_causal:
            attn_mask = torch.ones(tokens, tokens, dtype=torch.bool).tril()
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float('-inf'))
        elif attn_mask is not None:
            logits = logits + attn_mask
        out = reference_topk_softmax(logits, topk) @ value
        out = attn.norm(out.transpose(1, 2).reshape(batch, tokens, attn.attn_dim))
        if attn.gate is not None:
            out = out * attn.gate(x).sigmoid()
        return attn.proj(out)

    return forward


@pytest.mark.parametrize('name', sorted(MODELS))
def test_conversion_keeps_timm_parameters_and_keys(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    cls, params, keys = type(model), dict(model.named_parameters()), list(model.state_dict())
    assert convert_to_knn_attention(model, topk=0.5) is model
    assert type(model) is cls
    assert [type(block.attn) for block in model.blocks] == [KNNTimmAttention] * ARCH['depth']
    assert not any(type(m) is timm_layers.Attention for m in model.modules())
    assert list(model.state_dict()) == keys
    assert list(dict(model.named_parameters())) == list(params)
    assert all(param is params[key] for key, param in model.named_parameters())
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize('name', sorted(MODELS))
@pytest.mark.parametrize('topk', [1.0, 10**6])
def test_full_topk_reproduces_timm_model(name, topk, tmp_path):
    plain, converted = build_pair(name, topk, tmp_path)
    with torch.no_grad():
        expected, out = plain(images()), converted(images())
    assert out.shape == (3, ARCH['num_classes'])
    # Float64: both run dense attention on the same weights, so only round-off may differ
    # (none with timm's fused path, which calls scaled_dot_product_attention as k = N does).
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('name', sorted(MODELS))
@pytest.mark.parametrize('topk', [1, 5, 0.5])
def test_topk_below_num_keys_matches_reference(name, topk, tmp_path):
    plain, converted = build_pair(name, topk, tmp_path)
    with torch.no_grad():
        dense = plain(images())
        for block in plain.blocks:
            block.attn.forward = reference_forward(block.attn, topk)
        expected, out = plain(images()), converted(images())
    # Float64 logits of random weights have no ties within round-off, so both select the
    # same keys and differ only by the order of their float64 operations.
    # Measured 4e-16.
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, dense, rtol=1e-3, atol=1e-3)


def timm_attention(**options):
    torch.manual_seed(2)
    attn = timm_layers.Attention(32, num_heads=4, qkv_bias=True, **options).double().eval()
    for param in attn.parameters():
        nn.init.normal_(param, std=0.3)
    return attn


ATTENTION_OPTIONS = {
    'plain': dict(),
    'qk-norm, scale-norm, gated, head dim, dim out': dict(
        qk_norm=True, scale_norm=True, gated=True, attn_head_dim=6, dim_out=24,
        norm_layer=nn.LayerNorm),
}


def masks(tokens, seed=3):
    generator = torch.Generator().manual_seed(seed)
    allowed = torch.rand(2, 1, tokens, tokens, generator=generator) > 0.5
    allowed.diagonal(dim1=-2, dim2=-1).fill_(True)  # every query keeps one key
    bias = torch.randn(2, 4, tokens, tokens, generator=generator, dtype=torch.float64)
    return {'none': {}, 'bool': dict(attn_mask=allowed), 'float': dict(attn_mask=bias),
            'causal': dict(is_causal=True)}


@pytest.mark.parametrize('options', sorted(ATTENTION_OPTIONS))
@pytest.mark.parametrize('mask', ['none', 'bool', 'float', 'causal'])
@pytest.mark.parametrize('fused', [True, False])
def test_attention_options_and_masks_at_full_topk(options, mask, fused):
    attn = timm_attention(**ATTENTION_OPTIONS[options])
    attn.fused_attn = fused
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = attn(x, **masks(13)[mask])
        out = KNNTimmAttention(attn, 1.0)(x, **masks(13)[mask])
    # Float64 round-off only (measured 4e-15).
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('options', sorted(ATTENTION_OPTIONS))
@pytest.mark.parametrize('mask', ['none', 'bool', 'float', 'causal'])
def test_attention_options_and_masks_below_full_topk(options, mask):
    attn = timm_attention(**ATTENTION_OPTIONS[options])
    knn = KNNTimmAttention(attn, 4)
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = reference_forward(attn, 4)(x, **masks(13)[mask])
        out = knn(x, **masks(13)[mask])
    # Float64, the same keys, another order of operations: measured 2e-15; float64 eps
    # (2.2e-16) times sums of fewer than 100 terms of order 1 stays below 1e-13.
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_tied_logits_at_the_threshold_are_all_kept():
    # Weights and tokens in {-1, 0, 1} and a power-of-two scale (head dim 16) make every
    # logit an exact small multiple of 1/4: equal logits are bitwise equal, and frequent.
    attn = timm_layers.Attention(32, num_heads=2).double().eval()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for param in attn.parameters():
            param.copy_(torch.randint(-1, 2, param.shape, generator=generator))
        x = torch.randint(-1, 2, (2, 17, 32), generator=generator).double()
        query, key, _ = attn.qkv(x).reshape(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
        logits = query @ key.transpose(-2, -1)
        kept = (logits >= logits.topk(5, dim=-1).values[..., -1:]).sum(-1)
        out = KNNTimmAttention(attn, 5)(x)
        expected = reference_forward(attn, 5)(x)
    assert (kept > 5).any(), 'the case must have ties at the threshold'
    # As above (measured 2e-14 on values up to 60).
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_training_backward_reaches_every_parameter(tmp_path):
    _, converted = build_pair('deit-distilled', 5, tmp_path)
    converted.train()
    plain = MODELS['deit-distilled']().double().train()
    for model in (plain, converted):
        model(images()).sum().backward()
    assert [key for key, p in converted.named_parameters() if p.grad is not None] == \
        [key for key, p in plain.named_parameters() if p.grad is not None]


def test_vit_without_timm_attention_is_refused():
    for other in (dict(block_fn=timm_vit.ParallelScalingBlock), dict(attn_layer='diff')):
        model = timm_vit.VisionTransformer(**ARCH, **other)
        with pytest.raises(TypeError, match='found no timm.layers.attention.Attention'):
            convert_to_knn_attention(model, 0.5)
    subclass = type('MyViT', (timm_vit.VisionTransformer, ), {})(**ARCH)
    with pytest.raises(TypeError, match='does not support the backbone'):
        convert_to_knn_attention(subclass, 0.5)


def test_mmseg_timm_backbone_route(tmp_path):
    pytest.importorskip('mmseg')
    # timm's DeiT-S shrunk to ARCH: create_model's arguments override the variant's.
    config = dict(type='mmseg.TIMMBackbone', model_name='deit_small_patch16_224',
                  pretrained=False, features_only=True, out_indices=(0, 1),
                  **{key: value for key, value in ARCH.items() if key != 'num_classes'})
    plain = REGISTRY.build(copy.deepcopy(config))
    # The ViT inside timm's feature wrapper holds timm's own keys.
    checkpoint = timm_checkpoint(plain.timm_model.model, tmp_path / 'deit.pth')
    load(plain.timm_model.model, checkpoint)
    models = {}
    for topk in (1.0, 5):
        model = REGISTRY.build(dict(type='mmsparsevit.KVT', topk=topk,
                                    backbone=copy.deepcopy(config)))
        assert type(model) is type(plain)
        assert list(model.state_dict()) == list(plain.state_dict())
        load(model.timm_model.model, checkpoint)
        models[topk] = model.eval()
    assert [type(block.attn) for block in models[5].timm_model.model.blocks] == \
        [KNNTimmAttention] * ARCH['depth']
    plain.eval()
    with torch.no_grad():
        expected = plain(images())
        full = models[1.0](images())
        for block in plain.timm_model.model.blocks:
            block.attn.forward = reference_forward(block.attn, 5)
        expected_sparse, sparse = plain(images()), models[5](images())
    assert [out.shape for out in full] == [(3, ARCH['embed_dim'], 4, 4)] * 2
    for outs, refs in ((full, expected), (sparse, expected_sparse)):
        for out, ref in zip(outs, refs):
            # Float64 round-off only, the same keys (measured 5e-15).
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # Sparse attention moves the output far beyond round-off.
    assert not torch.allclose(sparse[-1], expected[-1], rtol=1e-3, atol=1e-3)
    with pytest.raises(TypeError, match='only around timm'):
        REGISTRY.build(dict(type='mmsparsevit.KVT', topk=0.5, backbone=dict(
            type='mmseg.TIMMBackbone', model_name='resnet18', pretrained=False)))
