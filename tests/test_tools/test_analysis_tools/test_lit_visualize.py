# Copyright (c) mmsparsevit contributors. All rights reserved.
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from tool_test_utils import load_tool

from mmsparsevit.models.backbones import LIT

REPO = Path(__file__).resolve().parents[3]
TOOL = REPO / 'tools/analysis_tools/visualize_dtm_offsets.py'
ARCH = dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4),
            mlp_ratios=(2, 2, 2, 2))


def _load_tool():
    return load_tool('analysis_tools/visualize_dtm_offsets.py')


def test_sampling_points_in_image_pixels():
    tool = _load_tool()
    offsets = torch.zeros(8, 2, 3)
    offsets[0, 1, 2] = 0.5  # dy of tap (0, 0) of token (1, 2)
    points = tool.sampling_points(offsets, input_stride=8)
    # Tap (0, 1) of token (0, 0) reads input pixel (0, 1): image centre (3.5, 11.5).
    # Exact: half-pixel centres and offsets are sums of binary fractions.
    np.testing.assert_array_equal(points[0, 0, 1], [3.5, 11.5])
    np.testing.assert_array_equal(points[1, 2, 0], [(2 + 0.5 + 0.5) * 8 - 0.5, 35.5])


def test_visualiser_writes_a_png_of_the_image_size(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = LIT(arch=ARCH, pretrain_img_size=64)
    model.init_weights()
    torch.nn.init.normal_(model.stages[2].downsample.conv_offset.weight, std=0.5)
    checkpoint = tmp_path / 'lit_mini.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in model.state_dict().items()}},
               checkpoint)
    config = tmp_path / 'lit_mini.py'
    config.write_text(f"model = dict(type='Detector', backbone=dict(type='mmsparsevit.LIT', "
                      f'arch={ARCH!r}, pretrain_img_size=64))\n')
    image = tmp_path / 'image.png'
    pixels = np.random.default_rng(0).integers(0, 255, (75, 101, 3), dtype=np.uint8)
    cv2.imwrite(str(image), pixels)
    out = tmp_path / 'dtm.png'
    result = subprocess.run(
        [sys.executable, str(TOOL), str(config), str(checkpoint), str(image), '--out', str(out),
         '--stage', '2', '--grid', '4'], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    drawn = cv2.imread(str(out))
    assert drawn.shape == pixels.shape
    assert (drawn != pixels).any(axis=2).mean() > 0.01
    assert 'stage 2 DTM sampling of 4x6 tokens' in result.stdout
    tool = _load_tool()
    monkeypatch.setattr(sys, 'argv', ['visualize_dtm_offsets.py', str(config), str(checkpoint),
                                      str(image), '--out', str(out), '--stage', '0'])
    with pytest.raises(SystemExit, match='--stage 0: DTM layers open stages 1..3'):
        tool.main()
