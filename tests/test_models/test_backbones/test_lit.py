# Copyright (c) mmsparsevit contributors. All rights reserved.
import pytest
import torch
from mmengine.optim import DefaultOptimWrapperConstructor
from test_lit_reference import PUBLISHED_WITHOUT_HEAD, count

from mmsparsevit.models.backbones import LIT
from mmsparsevit.models.layers import LITAttention
from mmsparsevit.registry import MODELS

SMALL_ARCH = dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4),
                  mlp_ratios=(2, 2, 2, 2))


def _out_norm_params(dims, stages):
    return sum(2 * dims[i] for i in stages)


@pytest.mark.parametrize('arch', ['tiny', 'small', 'medium', 'base'])
def test_param_counts_against_the_published_imagenet_models(arch):
    with torch.device('meta'):
        model = LIT(arch=arch, pretrain_img_size=224)
    dims = LIT.arch_zoo[arch]['embed_dims']
    # ImageNet-only parameters that a dense backbone has no place for: the classifier's final
    # norm, and for LIT-Ti its class token and that token's row of pos_embed4.
    classifier_only = 2 * dims[3] + (2 * dims[3] if arch == 'tiny' else 0)
    out_norms = _out_norm_params(dims, LIT.arch_zoo[arch]['out_norms'])
    assert count(model) == PUBLISHED_WITHOUT_HEAD[arch] - classifier_only + out_norms
    assert model.num_features == dims


def test_dense_table_sizes_follow_pretrain_img_size():
    with torch.device('meta'):
        coco = LIT(arch='small', pretrain_img_size=800)
    table = coco.stages[2].blocks[0].attn.relative_position_bias_table
    assert table.shape == (99 * 99, 12)
    assert coco.stages[3].blocks[0].attn.relative_position_bias_table.shape == (49 * 49, 24)
    assert coco.stages[0].blocks[0].__class__.__name__ == 'LITMLPBlock'


@pytest.mark.parametrize('size', [(112, 137), (511, 511), (33, 33), (4, 4)])
def test_any_input_size(size):
    model = LIT(arch=SMALL_ARCH, pretrain_img_size=64).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    height, width = -(-size[0] // 4), -(-size[1] // 4)
    for index, out in enumerate(outs):
        assert out.shape == (1, SMALL_ARCH['embed_dims'][index], height, width)
        height, width = max(height // 2, 1), max(width // 2, 1)


def test_tiny_and_small_presets_shapes_and_registry():
    model = MODELS.build(dict(type='mmsparsevit.LIT', arch='tiny', out_indices=(1, 3)))
    model.init_weights()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 64, 96))
    assert [o.shape for o in outs] == [(2, 128, 8, 12), (2, 512, 2, 3)]
    model = LIT(arch='small', drop_path_rate=0.2)
    assert [hasattr(model, f'norm{i}') for i in range(4)] == [False, True, True, True]
    # The schedule computes 0.2 * i / (n - 1) in floating point, not the literal 0.2.
    assert model.stages[3].blocks[-1].ffn.dropout_layer.drop_prob == pytest.approx(0.2)


def test_init_weights_starts_dtm_as_a_strided_conv():
    model = LIT(arch=SMALL_ARCH)
    model.init_weights()
    for stage in model.stages[1:]:
        assert torch.count_nonzero(stage.downsample.conv_offset.weight) == 0
    table = model.stages[2].blocks[0].attn.relative_position_bias_table
    assert 0.005 < table.std() < 0.03


def test_frozen_stages_survive_train_and_norm_eval():
    model = LIT(arch=SMALL_ARCH, frozen_stages=2, norm_eval=True, out_norms=(1, 2, 3))
    model.train()
    frozen = [model.patch_embed, model.stages[0], model.stages[1], model.norm1]
    for module in frozen:
        assert not module.training
        assert all(not p.requires_grad for p in module.parameters())
    assert all(p.requires_grad for p in model.stages[2].parameters())
    assert model.stages[2].blocks[0].training
    assert not model.stages[3].downsample.norm.training  # norm_eval keeps BN in eval


def test_with_cp_gives_the_same_outputs_and_grads():
    torch.manual_seed(0)
    plain = LIT(arch=SMALL_ARCH, drop_path_rate=0.)
    checkpointed = LIT(arch=SMALL_ARCH, drop_path_rate=0., with_cp=True)
    checkpointed.load_state_dict(plain.state_dict())
    img = torch.randn(2, 3, 32, 32)
    grads = []
    for model in (plain, checkpointed):
        model.train()
        x = img.clone().requires_grad_()
        sum(o.square().mean() for o in model(x)).backward()
        grads.append(x.grad)
    # Bitwise: recomputation repeats the same arithmetic.
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    assert all(block.with_cp for stage in checkpointed.stages for block in stage.blocks)


def test_attention_logits_is_the_override_point():

    class NegatedLogits(LITAttention):

        def attention_logits(self, query, key, hw_shape):
            return -super().attention_logits(query, key, hw_shape)

    torch.manual_seed(0)
    attn = LITAttention(8, 2, rel_pos_size=(3, 3))
    attn.init_weights()
    swapped = NegatedLogits(8, 2, rel_pos_size=(3, 3))
    swapped.load_state_dict(attn.state_dict())
    x = torch.randn(1, 12, 8)
    assert not torch.allclose(attn(x, (3, 4)), swapped(x, (3, 4)))
    q, k = torch.randn(2, 1, 2, 12, 4).unbind(0)
    logits = attn.attention_logits(q, k, (3, 4))
    plain = (q @ k.transpose(-2, -1)) * 0.5
    bias = logits - plain
    # Relative bias depends only on the displacement: tokens (0,0)->(1,1) and (1,2)->(2,3).
    # The same table entries, recovered as float32 differences of logits of order 1, so a
    # few eps of the logits apart (measured 1e-7): assert_close's float32 default atol 1e-5.
    torch.testing.assert_close(bias[0, :, 0, 5], bias[0, :, 6, 11])


@pytest.mark.parametrize('rel_pos_size,fused_calls_expected', [((3, 3), 0), (None, 1)])
def test_fused_attention_equals_softmax_of_attention_logits(rel_pos_size, fused_calls_expected,
                                                            monkeypatch):
    """Without a bias the forward runs one fused SDPA call, which must equal the materialised
    softmax path that a subclass overriding attention_logits takes."""

    class Materialised(LITAttention):
        """Overriding attention_logits (here unchanged) takes the unfused path."""

        def attention_logits(self, query, key, hw_shape):
            return super().attention_logits(query, key, hw_shape)

    torch.manual_seed(0)
    fused = LITAttention(8, 2, rel_pos_size=rel_pos_size).double()
    fused.init_weights()
    materialised = Materialised(8, 2, rel_pos_size=rel_pos_size).double()
    materialised.load_state_dict(fused.state_dict())
    x = torch.randn(2, 20, 8, dtype=torch.float64)
    fused_calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention',
                        lambda *args, **kwargs: fused_calls.append(1) or sdpa(*args, **kwargs))
    outs, grads = [], []
    for attn in (fused, materialised):
        inputs = x.clone().requires_grad_()
        out = attn(inputs, (4, 5))
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([inputs.grad] + [param.grad for param in attn.parameters()])
    assert len(fused_calls) == fused_calls_expected
    # Float64, the fused kernel sums in another order: measured 1e-16 (1.3e-15 for the
    # gradients).
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for fused_grad, materialised_grad in zip(*grads):
        torch.testing.assert_close(fused_grad, materialised_grad, rtol=1e-12, atol=1e-12)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = fused.float()(x.float(), (4, 5))
    assert low.dtype == torch.bfloat16
    # bfloat16 rounds the input, the qkv and projection weights and outputs and the attention
    # output: six roundings of at most one unit (eps / 2) each, relative to the largest value,
    # against the float64 result (measured: 1.4 units).
    unit = torch.finfo(torch.bfloat16).eps / 2
    assert (low.double() - outs[0]).abs().max() <= 6 * unit * outs[0].abs().max()


def test_bad_arguments_are_named():
    with pytest.raises(KeyError, match="'huge'"):
        LIT(arch='huge')
    with pytest.raises(ValueError, match='has_msa'):
        LIT(arch='tiny', has_msa=(0, 1, 1))
    with pytest.raises(KeyError, match="missing keys \\['num_heads'\\]"):
        LIT(arch=dict(embed_dims=(8, ), depths=(1, ), mlp_ratios=(1, )))
    with pytest.raises(ValueError, match='out_indices'):
        LIT(arch='tiny', out_indices=(4, ))
    with pytest.raises(ValueError, match='num_heads'):
        LIT(arch=dict(SMALL_ARCH, num_heads=(1, 2, 5, 4)))


def test_backbone_trains_under_bfloat16_autocast():
    torch.manual_seed(0)
    model = LIT(arch=SMALL_ARCH)
    model.init_weights()
    img = torch.randn(2, 3, 40, 56)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outs = model(img)
    sum(o.float().square().mean() for o in outs).backward()
    assert model.stages[1].downsample.conv_offset.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        reference = model(img)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = model(img)
    # Some 28 bfloat16 roundings (patch embedding, DTMs, blocks) lie on the way to the last
    # stages, each of at most one unit (eps / 2): independent ones add in quadrature, about
    # 5.3 units; measured at most 3.4 units of the largest output. Bound: 8 units.
    unit = torch.finfo(torch.bfloat16).eps / 2
    for a, b in zip(low, reference):
        assert ((a.float() - b).abs().max() / b.abs().max()) < 8 * unit


def test_documented_offset_lr_multiplier_reaches_exactly_the_offset_convs():
    model = LIT(arch=SMALL_ARCH)
    constructor = DefaultOptimWrapperConstructor(
        dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-4, weight_decay=1e-4)),
        dict(custom_keys={'conv_offset': dict(lr_mult=0.01)}))
    optimizer = constructor(model).optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    slow = sorted(names[id(p)] for group in optimizer.param_groups
                  if group['lr'] == pytest.approx(1e-6)
                  for p in group['params'])
    assert slow == sorted(f'stages.{i}.downsample.conv_offset.{p}' for i in (1, 2, 3)
                          for p in ('weight', 'bias'))


@pytest.mark.parametrize('drop_rate', [0., 0.5])
def test_ffn_runs_gelu_linear_unless_dropout_sits_between(drop_rate):
    from mmcv.cnn.bricks.transformer import FFN

    from mmsparsevit.models.layers.lit_blocks import LITMLPBlock
    torch.manual_seed(0)
    block = LITMLPBlock(8, mlp_ratio=2, drop_rate=drop_rate).train()
    x = torch.randn(2, 12, 8, requires_grad=True)
    fused = block.ffn(block.norm(x), identity=x)
    uses_gelu_linear = 'GELULinear' in type(fused.grad_fn.next_functions[1][0]).__name__
    assert uses_gelu_linear == (drop_rate == 0)
    if drop_rate:
        return
    plain = FFN.forward(block.ffn, block.norm(x), identity=x)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    params = (x, *block.parameters())
    for got, expected in zip(torch.autograd.grad(fused.square().sum(), params),
                             torch.autograd.grad(plain.square().sum(), params)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
