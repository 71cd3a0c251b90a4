# Copyright (c) mmsparsevit contributors. All rights reserved.
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d as tv_deform_conv2d

from mmsparsevit.models.layers import DeformableTokenMerging


def _integer_valued_(dtm, gen):
    # Small integers make every product and sum exact in float32, so two correct
    # implementations must agree bit for bit.
    with torch.no_grad():
        dtm.weight.copy_(torch.randint(-3, 4, dtm.weight.shape, generator=gen).float())
        dtm.bias.copy_(torch.randint(-3, 4, dtm.bias.shape, generator=gen).float())


def test_zero_offsets_equal_a_strided_conv_exactly():
    gen = torch.Generator().manual_seed(0)
    dtm = DeformableTokenMerging(6, 10).eval()
    _integer_valued_(dtm, gen)
    x = torch.randint(-4, 5, (3, 6, 10, 14), generator=gen).float()
    merged, offsets = dtm.forward_with_offsets(x)
    assert torch.count_nonzero(offsets) == 0
    conv = F.conv2d(x, dtm.weight, dtm.bias, stride=2)
    assert torch.equal(dtm.deform_conv(x, offsets), conv)
    assert torch.equal(merged, F.gelu(dtm.norm(conv)))
    assert merged.shape == (3, 10, 5, 7)


def test_learned_offsets_match_torchvision_deform_conv():
    torch.manual_seed(0)
    dtm = DeformableTokenMerging(4, 8).eval()
    torch.nn.init.normal_(dtm.conv_offset.weight, std=0.5)
    torch.nn.init.normal_(dtm.conv_offset.bias, std=0.5)
    x = torch.randn(2, 4, 9, 12)  # odd height: the last row is not merged, as a strided conv
    merged, offsets = dtm.forward_with_offsets(x)
    assert offsets.shape == (2, 8, 4, 6) and offsets.abs().min() > 0
    expected = tv_deform_conv2d(x, offsets, dtm.weight, dtm.bias, stride=2)
    torch.testing.assert_close(dtm.deform_conv(x, offsets), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, F.gelu(dtm.norm(expected)), rtol=1e-5, atol=1e-5)


def test_backward_matches_torchvision_and_reaches_offsets():
    torch.manual_seed(0)
    dtm = DeformableTokenMerging(3, 5).double()
    torch.nn.init.normal_(dtm.conv_offset.weight, std=0.3)
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64, requires_grad=True)
    offsets = dtm.conv_offset(x)
    grads = torch.autograd.grad(dtm.deform_conv(x, offsets).square().sum(),
                                (x, dtm.weight, dtm.bias, dtm.conv_offset.weight))
    expected = torch.autograd.grad(
        tv_deform_conv2d(x, dtm.conv_offset(x), dtm.weight, dtm.bias, stride=2).square().sum(),
        (x, dtm.weight, dtm.bias, dtm.conv_offset.weight))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)
    assert grads[3].abs().sum() > 0


def test_autocast_cpu_bfloat16_forward_backward():
    torch.manual_seed(0)
    dtm = DeformableTokenMerging(8, 16)
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    reference = dtm(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = dtm(x.bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, rtol=0.05, atol=0.05)
    low.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert dtm.weight.grad is not None and dtm.bias.grad is not None


def test_maps_smaller_than_the_kernel_are_padded():
    dtm = DeformableTokenMerging(4, 6).eval()
    assert dtm(torch.randn(1, 4, 1, 5)).shape == (1, 6, 1, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_matches_cpu_under_autocast():
    torch.manual_seed(0)
    dtm = DeformableTokenMerging(8, 16).eval()
    torch.nn.init.normal_(dtm.conv_offset.weight, std=0.3)
    x = torch.randn(2, 8, 10, 12)
    expected = dtm(x)
    dtm.cuda()
    with torch.autocast('cuda', dtype=torch.float16):
        got = dtm(x.cuda().requires_grad_())
    got.float().sum().backward()
    torch.testing.assert_close(got.float().cpu(), expected, rtol=1e-2, atol=1e-2)
