# Copyright (c) mmsparsevit contributors. All rights reserved.
"""A NaN/Inf loss or gradient stops (or skips) training before it reaches the weights; bf16
stays finite."""
import math
from types import SimpleNamespace

import pytest
import torch
from mmengine.config import Config
from mmengine.structures import BaseDataElement
from robustness_utils import DistanceRegressor, capture_warnings, toy_runner

from mmsparsevit.engine import NonFiniteLossError, NonFiniteLossHook
from mmsparsevit.runtime import harden_train_config
from mmsparsevit.engine.hooks import non_finite_loss_hook
from mmsparsevit.models.backbones.vvt import VVT
from mmsparsevit.models.layers.vicinity_attention import VicinityAttention

GOOD = (1.0, 2.0)


def _weights_after(tmp_path, samples, model=None, **hook_args):
    runner = toy_runner(tmp_path, samples, max_iters=len(samples), model=model,
                        custom_hooks=[dict(type='mmsparsevit.NonFiniteLossHook', **hook_args)])
    try:
        runner.train()
    finally:
        weight = runner.model.weight.detach().clone()
    return runner, weight


def test_train_tool_config_enables_the_guard_and_keeps_a_configured_one():
    cfg = harden_train_config(Config(dict(work_dir='unused')))
    assert dict(type='mmsparsevit.NonFiniteLossHook') in cfg.custom_hooks
    mine = dict(type='mmsparsevit.NonFiniteLossHook', action='skip')
    cfg = harden_train_config(Config(dict(work_dir='unused', custom_hooks=[mine])))
    assert [h for h in cfg.custom_hooks if 'NonFinite' in h['type']] == [mine]


@pytest.mark.parametrize('bad', [math.nan, math.inf])
def test_stop_names_the_iteration_and_leaves_the_weights_of_the_last_good_step(tmp_path, bad):
    reference = toy_runner(tmp_path / 'ref', [GOOD] * 2, max_iters=2)
    reference.train()
    with pytest.raises(NonFiniteLossError) as raised:
        _weights_after(tmp_path / 'run', [GOOD, GOOD, (bad, 0.0), GOOD])
    kind = 'NaN' if math.isnan(bad) else 'infinite'
    assert str(raised.value).startswith(
        f'the training loss is {kind} at iteration 3 (epoch 1): loss={bad}')
    assert 'Training stopped before this step changed the weights' in str(raised.value)


def test_stopped_run_keeps_weights_and_writes_no_bad_checkpoint(tmp_path):
    runner = toy_runner(tmp_path, [GOOD, GOOD, (math.nan, 0.0), GOOD], max_iters=4,
                        custom_hooks=[dict(type='mmsparsevit.NonFiniteLossHook')],
                        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1,
                                                           by_epoch=False)))
    with pytest.raises(NonFiniteLossError):
        runner.train()
    reference = toy_runner(tmp_path / 'ref', [GOOD] * 2, max_iters=2)
    reference.train()
    assert torch.isfinite(runner.model.weight).all()
    torch.testing.assert_close(runner.model.weight, reference.model.weight, rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.glob('*.pth')) == ['iter_1.pth', 'iter_2.pth']


def test_skip_drops_only_the_bad_steps(tmp_path, monkeypatch):
    logged = capture_warnings(monkeypatch, non_finite_loss_hook)
    runner, weight = _weights_after(tmp_path / 'skip', [GOOD, (math.nan, 1.0), GOOD, GOOD],
                                    action='skip')
    hook = next(h for h in runner.hooks if isinstance(h, NonFiniteLossHook))
    assert hook.skipped_steps == 1
    assert logged == ['the training loss is NaN at iteration 2 (epoch 1): loss=nan; skipped '
                      'this step (1 skipped so far).']
    # Three good SGD steps, exactly as a run that never saw the bad sample.
    _, clean = _weights_after(tmp_path / 'clean', [GOOD] * 3)
    torch.testing.assert_close(weight, clean, rtol=0, atol=0)


def test_skip_stops_after_too_many_consecutive_bad_steps(tmp_path):
    bad = (math.inf, 0.0)
    with pytest.raises(NonFiniteLossError, match=r'iteration 4 .*3 consecutive steps'):
        _weights_after(tmp_path, [GOOD, bad, bad, bad, GOOD], action='skip',
                       max_consecutive_skips=2)


AT_THE_START = (0.0, 0.0)  # DistanceRegressor starts at weight (0, 0): 0/0 gradients


def test_finite_loss_with_nan_gradients_stops_and_names_the_parameter(tmp_path):
    with pytest.raises(NonFiniteLossError) as raised:
        _weights_after(tmp_path, [AT_THE_START, GOOD], model=DistanceRegressor())
    message = str(raised.value)
    assert message.startswith('the gradients are NaN although the loss is finite at iteration '
                              '1 (epoch 1): loss=0; non-finite gradients in 1 parameter(s): '
                              'weight. Training stopped before this step changed the weights')


def test_finite_loss_with_nan_gradients_is_skipped_like_a_bad_loss(tmp_path, monkeypatch):
    logged = capture_warnings(monkeypatch, non_finite_loss_hook)
    runner, weight = _weights_after(tmp_path / 'skip', [AT_THE_START, GOOD, GOOD],
                                    model=DistanceRegressor(), action='skip')
    assert logged == ['the gradients are NaN although the loss is finite at iteration 1 '
                      '(epoch 1): loss=0; non-finite gradients in 1 parameter(s): weight; '
                      'skipped this step (1 skipped so far).']
    _, clean = _weights_after(tmp_path / 'clean', [GOOD, GOOD], model=DistanceRegressor())
    assert torch.isfinite(weight).all()
    torch.testing.assert_close(weight, clean, rtol=0, atol=0)
    # Without the gradient check the NaN reaches the weights (and the next loss).
    _, unguarded = _weights_after(tmp_path / 'unguarded', [AT_THE_START],
                                  model=DistanceRegressor(), check_gradients=False)
    assert torch.isnan(unguarded).all()


@pytest.mark.parametrize('kwargs,match', [(dict(action='ignore'), 'action'),
                                          (dict(max_consecutive_skips=-1), 'max_consecutive')])
def test_invalid_hook_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NonFiniteLossHook(**kwargs)


def test_vicinity_attention_stays_finite_under_bf16_on_large_inputs():
    torch.manual_seed(0)
    attn = VicinityAttention(64, 2)
    x = (torch.randn(1, 96 * 96, 64) * 1e4).requires_grad_()
    reference = attn(x, (96, 96)).detach()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = attn(x, (96, 96))
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert torch.isfinite(x.grad).all()
    # Typical elements keep bf16 precision; a few near-zero normalisers lose more.
    error = (out.detach().float() - reference).abs()
    assert (error.median() / reference.abs().median()).item() < 1e-2
    assert torch.cosine_similarity(out.detach().float().flatten(), reference.flatten(),
                                   dim=0).item() > 0.99


def test_vvt_stays_finite_under_bf16_on_a_large_magnitude_image():
    torch.manual_seed(0)
    model = VVT(arch=dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1),
                          num_heads=(1, 2, 4, 8), mlp_ratios=(2, 2, 2, 2)), drop_path_rate=0.)
    model.eval()
    image = torch.randn(1, 3, 256, 256) * 1e4
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        outputs = model(image)
    assert [tuple(o.shape[2:]) for o in outputs] == [(64, 64), (32, 32), (16, 16), (8, 8)]
    assert all(torch.isfinite(o).all() for o in outputs)


def test_message_names_every_loss_term_and_the_batch_images():
    samples = [BaseDataElement(metainfo=dict(img_path=f'data/train/{i:06d}.jpg')) for i in (3, 7)]
    message = NonFiniteLossHook._describe(
        SimpleNamespace(iter=36, epoch=1), 'the training loss is NaN',
        dict(loss=torch.tensor(math.nan), loss_cls=torch.tensor(math.nan),
             loss_bbox=torch.tensor(0.25)), dict(inputs=[], data_samples=samples))
    assert message == ('the training loss is NaN at iteration 37 (epoch 2): loss=nan, '
                       'loss_cls=nan, loss_bbox=0.25 (batch images: data/train/000003.jpg, '
                       'data/train/000007.jpg)')
