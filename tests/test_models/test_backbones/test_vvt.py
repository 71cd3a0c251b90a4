"""VVT backbone: presets, contract, errors, checkpoint conversion and faithfulness.

Faithfulness is checked against ``PlainVVT`` (tools/analysis_tools/transcriptions), an
independent transcription of the authors' model (OpenNLPLab/Vicinity-Vision-Transformer,
classification/vvt.py) that shares no code with the backbone and uses their parameter names,
so its state dict has the official checkpoint layout.
"""
import copy
from pathlib import Path

import pytest
import torch
from tool_test_utils import load_tool
from torch import nn

from mmsparsevit.models import VVT
from mmsparsevit.models.backbones.vvt import convert_vvt_checkpoint
from mmsparsevit.registry import MODELS
from transcriptions import PlainVVT

SMALL_ARCH = dict(
    embed_dims=(16, 24, 32, 48), depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 3),
    mlp_ratios=(2, 2, 4, 2))
REPO_ROOT = Path(__file__).resolve().parents[3]


def official_model(arch=SMALL_ARCH, seed=0):
    torch.manual_seed(seed)
    model = PlainVVT(**arch, num_classes=10).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if 'norm' in name:
                param.add_(torch.randn_like(param) * 0.1)
            elif param.dim() == 1:
                param.normal_(0, 0.05)
    return model


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize('arch,expected', [('tiny', 12_369_440), ('small', 24_979_264),
                                           ('medium', 47_394_304), ('large', 61_335_520),
                                           ('s', 24_979_264)])
def test_preset_parameter_counts(arch, expected):
    with torch.device('meta'):
        model = VVT(arch=arch)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.num_features == (96, 160, 320, 512)


# An independent transcription sums in another order: round-off only, measured 6e-7 (5
# eps) and 1.7e-15 (8 eps) of the largest output; margins of 15 and 60.
@pytest.mark.parametrize('dtype,tolerance', [(torch.float32, 1e-5), (torch.float64, 1e-13)])
def test_matches_official_model_with_converted_weights(dtype, tolerance):
    official = official_model().to(dtype)
    model = VVT(arch=SMALL_ARCH, drop_path_rate=0.).eval().to(dtype)
    model.load_state_dict(convert_vvt_checkpoint(official.state_dict())[0], strict=True)
    torch.manual_seed(1)
    sizes = [(64, 64), (45, 38)] if dtype == torch.float32 else [(45, 38)]
    for size in sizes:
        x = torch.randn(2, 3, *size, dtype=dtype)
        with torch.no_grad():
            expected = official(x)
            outs = model(x)
        assert len(outs) == 4
        for out, ref in zip(outs, expected):
            assert out.shape == ref.shape
            assert relative_error(out, ref) < tolerance


def test_converter_round_trip_official_layout():
    official_state = official_model().state_dict()
    snapshot = dict(official_state)
    model = VVT(arch=SMALL_ARCH)
    for wrapped in (official_state, {'model': official_state},
                    {'state_dict': official_state, 'meta': {}}):
        converted, dropped = convert_vvt_checkpoint(wrapped)
        assert dropped == dict.fromkeys(('head.weight', 'head.bias'), 'classification head')
        result = model.load_state_dict(converted, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
    assert len(converted) == len(official_state) - 2
    assert official_state.keys() == snapshot.keys()
    # Idempotent on our own layout; DataParallel prefixes are stripped.
    assert convert_vvt_checkpoint(converted)[0].keys() == converted.keys()
    prefixed = {f'module.{k}': v for k, v in official_state.items()}
    assert convert_vvt_checkpoint(prefixed)[0].keys() == converted.keys()
    assert converted['stages.1.blocks.1.attn.se_reduce.weight'] is \
        official_state['block2.1.attn.se_fc.0.weight']


def test_converter_rejects_other_architectures():
    with pytest.raises(ValueError, match='not a VVT checkpoint.*layers.0.blocks.0.attn.qkv'):
        convert_vvt_checkpoint({'layers.0.blocks.0.attn.qkv.weight': torch.zeros(3)})
    other, _ = convert_vvt_checkpoint(
        official_model(dict(SMALL_ARCH, depths=(1, 1, 1, 1))).state_dict())
    with pytest.raises(ValueError, match=r'other\.pth does not match VVT.* missing '
                       r'\(stages\.1\.blocks\.1\.'):
        VVT(arch=SMALL_ARCH).check_state_dict(other, source='other.pth')
    wider, _ = convert_vvt_checkpoint(
        official_model(dict(SMALL_ARCH, mlp_ratios=(4, 2, 4, 2))).state_dict())
    with pytest.raises(ValueError, match=r'stages\.0\.blocks\.0\.ffn\.fc1\.weight: checkpoint'):
        VVT(arch=SMALL_ARCH).check_state_dict(wider, source='wider.pth')


@pytest.mark.parametrize('wrap', [lambda sd: sd, lambda sd: {'model': sd}])
def test_init_cfg_loads_official_checkpoint(tmp_path, wrap):
    official = official_model()
    path = tmp_path / 'vvt_official.pth'
    torch.save(wrap(official.state_dict()), path)
    model = VVT(arch=SMALL_ARCH, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        for out, ref in zip(model.eval()(x), official(x)):
            # float32 round-off against the transcription, as above (measured 7e-7).
            assert relative_error(out, ref) < 1e-5


def test_init_cfg_prefix_and_mismatch(tmp_path):
    official = official_model()
    ours, _ = convert_vvt_checkpoint(official.state_dict())
    path = tmp_path / 'detector.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in ours.items()}}, path)
    model = VVT(arch=SMALL_ARCH,
                init_cfg=dict(type='Pretrained', checkpoint=str(path), prefix='backbone.'))
    model.init_weights()
    # Loaded, not computed: bitwise.
    torch.testing.assert_close(model.stages[3].norm.weight, official.norm4.weight, rtol=0,
                               atol=0)

    other = tmp_path / 'other.pth'
    torch.save(official_model(dict(SMALL_ARCH, depths=(1, 1, 1, 1))).state_dict(), other)
    model = VVT(arch=SMALL_ARCH, init_cfg=dict(type='Pretrained', checkpoint=str(other)))
    with pytest.raises(ValueError, match=r'other\.pth does not match VVT.*stages\.1\.blocks\.1'):
        model.init_weights()


def test_converter_cli(tmp_path):
    cli = load_tool('model_converters/vvt2mmsparsevit.py')
    with torch.device('meta'):
        official_tiny = PlainVVT((96, 160, 320, 512), (2, 2, 2, 2), (1, 2, 5, 8), (8, 8, 4, 4))
    src, dst = tmp_path / 'vvt_tiny.pth', tmp_path / 'out' / 'vvt_tiny_converted.pth'
    state = {k: torch.zeros(v.shape) for k, v in official_tiny.state_dict().items()}
    torch.save({'model': state}, src)
    cli.main([str(src), str(dst)])
    saved = torch.load(dst, weights_only=True)
    assert saved['meta']['arch'] == 'tiny'
    model = VVT(arch='tiny')
    result = model.load_state_dict(saved['state_dict'], strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    custom = tmp_path / 'custom.pth'
    torch.save(official_model().state_dict(), custom)
    with pytest.raises(SystemExit, match='match no VVT preset'):
        cli.main([str(custom), str(tmp_path / 'x.pth')])
    with pytest.raises(SystemExit, match=r'custom\.pth does not match VVT'):
        cli.main([str(custom), str(tmp_path / 'x.pth'), '--arch', 'tiny'])


@pytest.mark.parametrize('size,expected', [
    ((112, 137), [(28, 35), (14, 18), (7, 9), (4, 5)]),
    ((33, 33), [(9, 9), (5, 5), (3, 3), (2, 2)]),
    ((511, 511), [(128, 128), (64, 64), (32, 32), (16, 16)]),
])
def test_any_input_size(size, expected):
    model = VVT(arch=SMALL_ARCH if size == (511, 511) else 'tiny').eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    assert [tuple(out.shape[2:]) for out in outs] == expected
    assert [out.shape[1] for out in outs] == list(model.num_features)
    assert all(torch.isfinite(out).all() for out in outs)


def test_registry_out_indices_and_in_channels():
    model = MODELS.build(
        dict(type='mmsparsevit.VVT', arch=SMALL_ARCH, in_channels=1, out_indices=(3, 1)))
    outs = model(torch.randn(2, 1, 32, 32))
    assert [tuple(out.shape) for out in outs] == [(2, 24, 4, 4), (2, 48, 1, 1)]
    assert VVT(arch=SMALL_ARCH, out_indices=-1).out_indices == (3, )


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(arch='huge'), KeyError, "unknown VVT arch 'huge'"),
    (dict(arch=dict(embed_dims=(8, ), depths=(1, ))), KeyError, r"missing keys \['num_heads'"),
    (dict(arch=dict(SMALL_ARCH, depths=(1, 1))), ValueError, "'embed_dims' must list one value"),
    (dict(arch=dict(SMALL_ARCH, window=7)), KeyError, r"unknown keys \['window'\]"),
    (dict(out_indices=(0, 4)), ValueError, 'out_indices entry 4 is out of range'),
    (dict(out_indices=()), TypeError, 'out_indices'),
    (dict(frozen_stages=5), ValueError, 'frozen_stages'),
])
def test_invalid_arguments(kwargs, error, match):
    kwargs.setdefault('arch', SMALL_ARCH)
    with pytest.raises(error, match=match):
        VVT(**kwargs)


def test_wrong_input_channels():
    model = VVT(arch=SMALL_ARCH)
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\).*got \(1, 4, 32, 32\)'):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match='in_channels=3'):
        model(torch.randn(3, 32, 32))


def test_frozen_stages_survive_train():
    model = VVT(arch=SMALL_ARCH, frozen_stages=2)
    model.train()
    for i, stage in enumerate(model.stages):
        frozen = i < 2
        assert all(not m.training for m in stage.modules()) == frozen
        assert all(p.requires_grad != frozen for p in stage.parameters())
    sum(out.sum() for out in model(torch.randn(1, 3, 32, 32))).backward()
    assert all(p.grad is None for p in model.stages[:2].parameters())
    assert all(p.grad is not None for p in model.stages[2:].parameters())

    stem_only = VVT(arch=SMALL_ARCH, frozen_stages=0).train()
    assert not any(p.requires_grad for p in stem_only.stages[0].patch_embed.parameters())
    assert all(p.requires_grad for p in stem_only.stages[0].blocks.parameters())


def test_norm_eval_leaves_layer_norms_training():
    """norm_eval freezes running statistics; VVT's LayerNorms have none and keep training."""
    model = VVT(arch=SMALL_ARCH, norm_eval=True).train()
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 4 * 2 + 5 * 2
    assert all(m.training for m in model.modules())


def test_with_cp_same_outputs_and_gradients(monkeypatch):
    torch.manual_seed(0)
    plain = VVT(arch=SMALL_ARCH, drop_path_rate=0.)
    checkpointed = VVT(arch=SMALL_ARCH, drop_path_rate=0., with_cp=True)
    checkpointed.load_state_dict(plain.state_dict())
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, 'checkpoint',
                        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    x = torch.randn(1, 3, 32, 32)
    for model in (plain, checkpointed):
        sum(out.pow(2).sum() for out in model(x)).backward()
    assert len(calls) == sum(SMALL_ARCH['depths'])
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        # Bitwise: recomputation repeats the same arithmetic.
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = VVT(arch=SMALL_ARCH)
    # A random projection: the channel mean of a LayerNorm output has no gradient.
    sum((out * torch.randn_like(out)).sum() for out in model(torch.randn(2, 3, 37, 29))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_drop_path_rates_and_default_init():
    model = VVT(arch=SMALL_ARCH, drop_path_rate=0.4)
    rates = [getattr(block.drop_path, 'drop_prob', 0.) for stage in model.stages
             for block in stage.blocks]
    # rate * i / (n - 1) in floating point, not the decimal literals.
    assert rates == pytest.approx([0., 0.1, 0.2, 0.3, 0.4])
    model.init_weights()
    fc1 = model.stages[0].blocks[0].ffn.fc1
    assert fc1.bias.abs().sum() == 0 and 0.015 < fc1.weight.std() < 0.025
    assert torch.equal(model.stages[0].norm.weight, torch.ones(16))


class OutOfPlaceGELU(nn.Module):
    """GELU that is not an ``nn.GELU``: VVTFFN always applies it out of place."""

    def __init__(self, approximate):
        super().__init__()
        self.approximate = approximate

    def forward(self, x):
        return torch.nn.functional.gelu(x, approximate=self.approximate)


@pytest.mark.parametrize('approximate', ['none', 'tanh'])
def test_ffn_activation_in_place_only_where_autograd_keeps_nothing(approximate):
    from mmsparsevit.models.backbones.vvt import VVTFFN
    torch.manual_seed(0)
    ffn = VVTFFN(8, 16, act_cfg=dict(type='GELU', approximate=approximate))
    reference = copy.deepcopy(ffn)
    reference.act = OutOfPlaceGELU(approximate)
    x = torch.randn(2, 6 * 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(ffn(x, (6, 5)), reference(x, (6, 5)), rtol=0, atol=0)
    # With autograd recording, the activation's input must survive for its backward.
    # gelu_linear multiplies a contiguous copy of the activation (where the convolution's
    # output is not channels-last), so the sums may run in another order.
    x.requires_grad_()
    outputs = [model(x, (6, 5)) for model in (ffn, reference)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    grads = [torch.autograd.grad((out * out).sum(), (x, *model.parameters()))
             for out, model in zip(outputs, (ffn, reference))]
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
