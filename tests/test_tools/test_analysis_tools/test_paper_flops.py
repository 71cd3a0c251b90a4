"""Our counts of VVT and LIT against the exact figures of the authors' models.

The authors counted with fvcore (norms at 5 FLOPs per element) on ImageNet models with a
1000-class linear head; the backbones here have no head, so its multiply-adds
(channels x 1000) are added. The products-only default lies at most 0.6 % below.
"""
import pytest

from measure import build_model, load_model_spec, measure_complexity

# name: (parameters without head, FLOPs in G as printed, last-stage channels)
AUTHORS = {'vvt-t': (12_369_440, 3.00, 512), 'lit-s': (27_204_720, 4.09, 768)}
# Parameters the backbone has beyond the authors' model without head: LIT-S's output norms
# norm1 and norm2 on its 192- and 384-channel stages (norm3 takes the place of the
# classifier's final norm); VVT-T's backbone is the ImageNet model without head.
BACKBONE_ONLY = {'vvt-t': 0, 'lit-s': 2 * (192 + 384)}


@pytest.mark.parametrize('name', sorted(AUTHORS))
def test_authors_flops_reproduced_with_fvcore_convention(name):
    params, flops, channels = AUTHORS[name]
    model = build_model(*load_model_spec(backbone=name))
    fvcore = measure_complexity(model, (224, 224), convention='fvcore')
    products = measure_complexity(model, (224, 224))
    head = channels * 1000
    assert round((fvcore.flops + head) / 1e9, 2) == flops
    assert 0.994 < (products.flops + head) / 1e9 / flops < 1.0
    assert products.params == params + BACKBONE_ONLY[name]
