# Copyright (c) mmsparsevit contributors. All rights reserved.
"""``torch.compile`` of every backbone: graph breaks, recompiles when the input size changes,
and compiled outputs (and gradients) equal to eager ones.

Graph breaks and recompiles are counted with dynamo's own tools (``torch._dynamo.explain``
and a counting backend, which compiles nothing), so those tests cost only the tracing.
``EXPECTED`` holds what the code achieves now; lowering a number there is the point of
removing a break or a recompile.
"""
import pytest
import torch
import torch._dynamo as dynamo
from mmengine.registry import DefaultScope
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

import mmsparsevit.models  # noqa: F401  registers the backbones
from mmsparsevit.registry import MODELS

pytest.importorskip('mmdet')
pytestmark = pytest.mark.slow

# Tiny archs: one block per stage (two in Swin's first stage, for its shifted windows), so
# that tracing and compiling stay within seconds. KVT keeps half of the keys, so that the
# k-NN path (not its dense shortcut at full k) is traced.
BACKBONES = {
    'VVT': dict(
        type='mmsparsevit.VVT',
        arch=dict(embed_dims=(16, 24, 32, 48), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 3),
                  mlp_ratios=(2, 2, 2, 2)),
        drop_path_rate=0.),
    'LIT': dict(
        type='mmsparsevit.LIT',
        arch=dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4),
                  mlp_ratios=(2, 2, 2, 2)),
        pretrain_img_size=64,
        drop_path_rate=0.),
    'KVT-Swin': dict(
        type='mmsparsevit.KVT',
        topk=0.5,
        backbone=dict(type='mmdet.SwinTransformer', embed_dims=32, depths=(2, 1, 1, 1),
                      num_heads=(1, 2, 2, 4), window_size=7, drop_path_rate=0.)),
    'KVT-PVTv2': dict(
        type='mmsparsevit.KVT',
        topk=0.5,
        backbone=dict(type='mmdet.PyramidVisionTransformerV2', embed_dims=32,
                      num_layers=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), drop_path_rate=0.)),
}

# Input sizes of the recompile test, in call order: the first size compiles a static graph;
# the second recompiles it with dynamic sizes (dynamo's automatic_dynamic_shapes); later
# sizes reuse that graph unless the code branches on a size or loops a size-dependent
# number of times; the last size was seen before and must compile nothing.
SIZES = ((64, 64), (96, 96), (80, 112), (64, 64))

# What the code achieves now: graph breaks of one forward (eval and train mode alike), and
# graphs compiled by each call of SIZES, with why each recompile after the second happens.
EXPECTED = {
    'VVT': dict(graph_breaks=0, graphs_per_call=(1, 1, 0, 0)),
    'LIT': dict(graph_breaks=0, graphs_per_call=(1, 1, 0, 0)),
    # Compiled with dynamic=False: mmdet's Swin takes about 90 s to trace with symbolic sizes
    # (on 2 CPU cores), so every new size is a static graph here. With automatic dynamic
    # sizes it also recompiles at 80x112 (mmdet swin.py:249 branches on the window padding).
    'KVT-Swin': dict(graph_breaks=0, graphs_per_call=(1, 1, 1, 0)),
    # _KNNAttentionFunction's loop over query chunks (knn_attention.py) is unrolled, so every
    # token count is a graph of its own.
    'KVT-PVTv2': dict(graph_breaks=0, graphs_per_call=(1, 1, 1, 0)),
}
DYNAMIC = {'KVT-Swin': False}


def build(name):
    with DefaultScope.overwrite_default_scope('mmdet'):
        torch.manual_seed(0)
        model = MODELS.build(BACKBONES[name])
    model.eval()  # not chained: mmdet's Swin returns None from train()
    return model


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch: dynamo's caches and counters are per process."""
    dynamo.reset()
    yield
    dynamo.reset()


@pytest.mark.parametrize('training', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_graph_breaks(name, training):
    model = build(name)
    model.train(training)
    with torch.set_grad_enabled(training):
        explanation = dynamo.explain(model)(torch.randn(1, 3, 64, 64))
    reasons = [reason.reason for reason in explanation.break_reasons]
    assert explanation.graph_break_count == EXPECTED[name]['graph_breaks'], reasons
    assert explanation.graph_count == EXPECTED[name]['graph_breaks'] + 1


@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_recompiles_when_the_input_size_changes(name):
    model = build(name)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, dynamic=DYNAMIC.get(name))
    graphs_per_call = []
    with torch.no_grad():
        for size in SIZES:
            before = counter.frame_count
            compiled(torch.randn(1, 3, *size))
            graphs_per_call.append(counter.frame_count - before)
    assert tuple(graphs_per_call) == EXPECTED[name]['graphs_per_call']


def _relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# Compiled graphs compute the same operations in another order (fused reductions, matmuls
# decomposed or reassociated), so float32 results differ by rounding: a few 1e-7 per
# operation, a few 1e-6 after the backbone (measured). 1e-4 of the largest output leaves
# room for that and still catches any real difference (a wrong op, a dropped bias or
# position term, a wrong top-k selection), which changes outputs by 1e-2 or more.
RELATIVE_TOLERANCE = 1e-4


def test_inductor_forward_equals_eager():
    """VVT only: an inductor compile from a cold cache takes 20-45 s per tiny backbone on 2
    CPU cores. VVT has the most hand-written numerics (magnitude clamps, float32 islands);
    benchmark_compile.py reports the difference of every backbone at 224x224."""
    model = build('VVT')
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
        actual = torch.compile(model)(images)
    assert len(actual) == len(expected) == 4
    for out, ref in zip(actual, expected):
        assert out.shape == ref.shape
        assert _relative_error(out, ref) < RELATIVE_TOLERANCE


@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_compiled_training_step_equals_eager(name):
    """Forward and backward through dynamo and AOTAutograd (the graphs inductor would get,
    custom autograd Functions included), run without code generation."""
    model = build(name)
    model.train()
    images = torch.randn(2, 3, 64, 64)

    def loss_and_grads(forward):
        model.zero_grad(set_to_none=True)
        loss = sum(out.pow(2).mean() for out in forward(images))
        loss.backward()
        return loss.detach(), {key: param.grad for key, param in model.named_parameters()}

    counter = CompileCounterWithBackend('aot_eager')
    actual_loss, actual_grads = loss_and_grads(torch.compile(model, backend=counter))
    expected_loss, expected_grads = loss_and_grads(model)
    assert counter.frame_count == 1
    assert _relative_error(actual_loss, expected_loss) < RELATIVE_TOLERANCE
    assert actual_grads.keys() == expected_grads.keys()
    for key, grad in expected_grads.items():
        if grad is None:
            assert actual_grads[key] is None, key
        else:
            assert _relative_error(actual_grads[key], grad) < RELATIVE_TOLERANCE, key
