"""Which backbone settings DDP can train with ``find_unused_parameters=False`` (the default).

DDP without the unused-parameter search waits for a gradient of every parameter that requires
one; a trainable parameter that the forward pass does not reach makes the second iteration fail
("Expected to have finished reduction in the prior iteration"), or hang when ranks differ. These
tests pin down, for our backbones, that every trainable parameter gets a gradient in the default
set-ups, including frozen stages (frozen in ``__init__``, before DDP registers its hooks) and
LIT's MLP-only stages, and which set-ups need ``find_unused_parameters=True``
(docs/distributed.md lists them).
"""
import pytest
import torch

import mmsparsevit.models  # noqa: F401
from mmsparsevit.registry import MODELS

TINY_ARCH = dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                 mlp_ratios=(2, 2, 2, 2))


def params_without_grad(backbone_cfg: dict):
    torch.manual_seed(0)
    backbone = MODELS.build(dict(backbone_cfg, arch=TINY_ARCH, drop_path_rate=0.0))
    # as the runner builds the model: DDP registers the parameters before train() runs
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    backbone.train()
    outputs = backbone(torch.randn(2, 3, 64, 64))
    sum(out.float().mean() for out in outputs).backward()
    return trainable, sorted(n for n, p in backbone.named_parameters()
                             if n in trainable and p.grad is None)


@pytest.mark.parametrize('backbone_type', ['mmsparsevit.LIT', 'mmsparsevit.VVT'])
@pytest.mark.parametrize('frozen_stages', [-1, 0, 1, 2])
def test_every_trainable_parameter_gets_a_gradient(backbone_type, frozen_stages):
    trainable, unused = params_without_grad(
        dict(type=backbone_type, frozen_stages=frozen_stages))
    assert trainable
    assert unused == []


def test_lit_mlp_only_stages_and_attention_stages_all_train():
    trainable, unused = params_without_grad(dict(type='mmsparsevit.LIT', has_msa=(0, 0, 1, 1)))
    assert unused == []
    assert any('attn' in n for n in trainable)


@pytest.mark.parametrize('backbone_type', ['mmsparsevit.LIT', 'mmsparsevit.VVT'])
def test_dropping_the_last_output_leaves_parameters_unused(backbone_type):
    """out_indices without the last stage: DDP then needs find_unused_parameters=True."""
    _, unused = params_without_grad(dict(type=backbone_type, out_indices=(0, 1, 2)))
    assert unused, 'the last stage is unused; if the backbone skips building it, update the docs'
