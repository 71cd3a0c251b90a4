# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Frozen means frozen, checked on values after real optimizer steps, and ``with_cp`` is the
same computation as without it.

For VVT, LIT, and KVT around mmdet's Swin, mmdet's PVTv2 and LIT: AdamW steps in ``train()``
mode leave every parameter of the frozen stages bitwise unchanged and change every other one;
under ``norm_eval`` every BatchNorm's running statistics stay bitwise unchanged. Which
parameters are frozen is written out here by name, not taken from the backbones'
``stem_modules`` / ``stage_modules`` under test.
"""
import copy

import pytest
import torch
import torch.utils.checkpoint
from torch.nn.modules.batchnorm import _BatchNorm

import mmsparsevit.models  # noqa: F401  registers the backbones
from mmsparsevit.registry import MODELS

pytest.importorskip('mmdet')

VVT_ARCH = dict(embed_dims=(16, 24, 32, 48), depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 3),
                mlp_ratios=(2, 2, 4, 2))
# Attention (and so k-NN attention under KVT) in stages 2-3; a DTM with a BatchNorm in 1-3.
LIT_ARCH = dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4),
                mlp_ratios=(2, 2, 2, 2))
# Two blocks in stage 1, so that its second one has shifted windows.
SWIN = dict(type='mmdet.SwinTransformer', embed_dims=16, depths=(1, 2, 1, 1),
            num_heads=(1, 1, 2, 2), window_size=7)
PVTV2 = dict(type='mmdet.PyramidVisionTransformerV2', embed_dims=16, num_layers=(1, 1, 1, 1),
             num_heads=(1, 1, 2, 2))


def kvt(backbone):
    return dict(type='mmsparsevit.KVT', topk=0.5, backbone=backbone)


# name -> (config builder taking the freezing options, parameter-name prefixes that
# frozen_stages=FROZEN_STAGES must freeze, whether the backbone has BatchNorms).
FROZEN_STAGES = 2
BACKBONES = {
    'VVT': (lambda **kw: dict(type='mmsparsevit.VVT', arch=VVT_ARCH, **kw),
            ('stages.0.', 'stages.1.'), False),
    # LIT's stage i owns its output norm norm{i}; stage 1's DTM (BatchNorm included) is frozen.
    'LIT': (lambda **kw: dict(type='mmsparsevit.LIT', arch=LIT_ARCH, out_norms=(1, 2, 3), **kw),
            ('patch_embed.', 'stages.0.', 'stages.1.', 'norm1.'), True),
    'KVT-LIT': (lambda **kw: kvt(dict(type='mmsparsevit.LIT', arch=LIT_ARCH,
                                      out_norms=(1, 2, 3), **kw)),
                ('patch_embed.', 'stages.0.', 'stages.1.', 'norm1.'), True),
    # mmdet's Swin: frozen_stages=k freezes the patch embedding, stages 0..k-1 (with the patch
    # merging that ends each) and their output norms norm0..norm{k-1}.
    'KVT-Swin': (lambda **kw: kvt(dict(SWIN, **kw)),
                 ('patch_embed.', 'stages.0.', 'stages.1.', 'norm0.', 'norm1.'), False),
    # mmdet's PVTv2 has no frozen_stages (test_pvtv2_has_no_freezing_options).
    'KVT-PVTv2': (lambda **kw: kvt(dict(PVTV2, **kw)), (), False),
}
NORM_EVAL_BACKBONES = ('VVT', 'LIT', 'KVT-LIT')  # the others have no norm_eval argument


def build(name, **kwargs):
    torch.manual_seed(0)
    model = MODELS.build(BACKBONES[name][0](drop_path_rate=0., **kwargs))
    model.init_weights()
    return model


def random_projection_loss(outputs, seed=1):
    """A loss with a gradient for every parameter: a plain sum has none through a LayerNorm's
    channel mean. Fixed projections, so that every step's loss is the same function."""
    generator = torch.Generator().manual_seed(seed)
    return sum((out * torch.randn(out.shape, generator=generator)).sum() for out in outputs)


def train_steps(model, steps=3):
    """AdamW steps in train() mode over all parameters, as mmengine's optimizer constructor
    passes frozen ones too. Adam's first step moves every parameter with a non-zero gradient by
    about lr, so lr=1e-2 changes each of them far beyond float32 round-off; weight decay would
    also move a frozen parameter that got a (even zero) gradient."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    generator = torch.Generator().manual_seed(2)
    for _ in range(steps):
        model.train()  # mmdet's Swin returns None here
        optimizer.zero_grad()
        random_projection_loss(model(torch.randn(2, 3, 64, 64, generator=generator))).backward()
        optimizer.step()


def batch_norm_statistics(model):
    return {f'{name}.{key}': value.clone() for name, module in model.named_modules()
            if isinstance(module, _BatchNorm)
            for key, value in module.named_buffers(recurse=False)}


@pytest.mark.parametrize('name', [n for n in BACKBONES if BACKBONES[n][1]])
def test_frozen_stages_do_not_move_and_the_rest_does(name):
    model = build(name, frozen_stages=FROZEN_STAGES)
    frozen_prefixes = BACKBONES[name][1]
    before = {key: param.detach().clone() for key, param in model.named_parameters()}
    statistics = batch_norm_statistics(model)
    train_steps(model)
    frozen = [key for key in before if key.startswith(frozen_prefixes)]
    assert frozen and len(frozen) < len(before)
    for key, param in model.named_parameters():
        assert torch.equal(param, before[key]) == (key in frozen), key
    # A frozen stage is in eval mode, so its BatchNorms (LIT's stage-1 DTM) keep their
    # statistics even without norm_eval.
    frozen_statistics = [key for key in statistics if key.startswith(frozen_prefixes)]
    assert bool(frozen_statistics) == BACKBONES[name][2]
    after = batch_norm_statistics(model)
    assert all(torch.equal(after[key], statistics[key]) for key in frozen_statistics)


@pytest.mark.parametrize('name', [n for n in BACKBONES if BACKBONES[n][1]])
def test_frozen_stages_need_no_gradients_from_the_build_on(name):
    """DDP registers the parameters that require gradients before the runner calls train();
    mmdet's Swin freezes only in train(), so KVT applies it when building (the two-process
    check: tests/test_distributed/test_kvt_frozen_ddp.py)."""
    model = build(name, frozen_stages=FROZEN_STAGES)
    for key, param in model.named_parameters():
        assert param.requires_grad != key.startswith(BACKBONES[name][1]), key


def test_pvtv2_has_no_freezing_options():
    """mmdet's PVTv2 refuses frozen_stages and norm_eval (nothing is silently ignored); with
    no BatchNorm, norm_eval would have nothing to do. Training moves every parameter."""
    for option in ('frozen_stages', 'norm_eval'):
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{option}'"):
            build('KVT-PVTv2', **{option: 1})
    model = build('KVT-PVTv2')
    before = {key: param.detach().clone() for key, param in model.named_parameters()}
    train_steps(model)
    assert not any(torch.equal(param, before[key]) for key, param in model.named_parameters())


@pytest.mark.parametrize('name', BACKBONES)
def test_which_backbones_have_batch_norms(name):
    """Only LIT's DTMs hold BatchNorms; for the others norm_eval has no statistics to keep."""
    norms = [m for m in build(name).modules() if isinstance(m, _BatchNorm)]
    # One DTM in each of LIT's stages 1-3.
    assert len(norms) == (3 if BACKBONES[name][2] else 0)
    if name not in NORM_EVAL_BACKBONES:
        with pytest.raises(TypeError, match="unexpected keyword argument 'norm_eval'"):
            build(name, norm_eval=True)


@pytest.mark.parametrize('norm_eval', [True, False])
@pytest.mark.parametrize('name', [n for n in NORM_EVAL_BACKBONES if BACKBONES[n][2]])
def test_norm_eval_keeps_batch_norm_statistics(name, norm_eval):
    """norm_eval: running mean, variance and batch count of every BatchNorm unchanged by
    training; without it they move (so the comparison can fail)."""
    model = build(name, norm_eval=norm_eval)
    statistics = batch_norm_statistics(model)
    assert len(statistics) == 3 * 3
    train_steps(model)
    after = batch_norm_statistics(model)
    assert [torch.equal(after[key], value) for key, value in statistics.items()] == (
        [norm_eval] * len(statistics))


def test_norm_eval_is_harmless_without_batch_norms():
    """VVT has LayerNorms only: norm_eval changes nothing, training moves every parameter."""
    model = build('VVT', norm_eval=True)
    assert not batch_norm_statistics(model)
    before = {key: param.detach().clone() for key, param in model.named_parameters()}
    train_steps(model)
    assert not any(torch.equal(param, before[key]) for key, param in model.named_parameters())


def count_checkpoint_calls(monkeypatch):
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    # Our CheckpointedBlock and mmdet's SwinBlock both look it up on the module at call time.
    monkeypatch.setattr(torch.utils.checkpoint, 'checkpoint', counting)
    return calls


@pytest.mark.filterwarnings('ignore:torch.utils.checkpoint. the use_reentrant parameter')
@pytest.mark.parametrize('name,num_blocks', [('VVT', 5), ('LIT', 5), ('KVT-Swin', 5)])
def test_with_cp_gives_the_same_outputs_and_parameter_gradients(name, num_blocks, monkeypatch):
    """Bitwise: recomputation repeats the forward arithmetic op for op, and
    torch.utils.checkpoint restores the RNG state (preserve_rng_state), so the drop-path masks
    of the recomputed forward are the ones the outputs used. mmdet's Swin uses the reentrant
    checkpoint, whose warning about the implicit use_reentrant is filtered here."""
    results = []
    for with_cp in (False, True):
        torch.manual_seed(0)
        model = MODELS.build(BACKBONES[name][0](drop_path_rate=0.3, with_cp=with_cp))
        model.init_weights()
        model.train()
        calls = count_checkpoint_calls(monkeypatch)
        torch.manual_seed(3)
        outputs = model(torch.randn(2, 3, 64, 64))
        random_projection_loss(outputs).backward()
        assert len(calls) == (num_blocks if with_cp else 0)
        results.append((outputs, {key: copy.deepcopy(param.grad)
                                  for key, param in model.named_parameters()}))
    (plain_outputs, plain_grads), (cp_outputs, cp_grads) = results
    assert all(torch.equal(a, b) for a, b in zip(plain_outputs, cp_outputs))
    assert plain_grads.keys() == cp_grads.keys()
    for key, grad in plain_grads.items():
        assert grad is not None and torch.equal(grad, cp_grads[key]), key


def test_with_cp_replays_the_drop_path_masks(monkeypatch):
    """Without the RNG replay the recomputed forward draws other drop-path masks and the
    gradients differ: the test above would notice a with_cp that does not restore the RNG."""
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, 'checkpoint',
                        lambda *a, **kw: original(*a, **dict(kw, preserve_rng_state=False)))
    grads = []
    for with_cp in (False, True):
        torch.manual_seed(0)
        model = MODELS.build(BACKBONES['VVT'][0](drop_path_rate=0.3, with_cp=with_cp)).train()
        torch.manual_seed(3)
        random_projection_loss(model(torch.randn(2, 3, 64, 64))).backward()
        grads.append([param.grad for param in model.parameters()])
    assert not all(torch.equal(a, b) for a, b in zip(*grads))
