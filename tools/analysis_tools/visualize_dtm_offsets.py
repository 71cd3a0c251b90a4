# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Draw where LIT's Deformable Token Merging samples, on the input image.

For a grid of output tokens of the chosen stage's DTM, the token's centre (white cross), its
regular 2x2 sampling positions (grey) and the learned, deformed ones (coloured, joined to the
centre) are drawn in image pixels. The PNG has the size of the input image.

Example:
    python tools/analysis_tools/visualize_dtm_offsets.py \
        configs/mask_rcnn/mask-rcnn_lit-s_fpn_1x_coco.py work_dirs/lit_s.pth demo.jpg \
        --out dtm_stage3.png --stage 3
"""
import argparse
from typing import Dict, Tuple

import cv2
import numpy as np
import torch
from mmengine.config import Config

from mmsparsevit.models.backbones import LIT
from mmsparsevit.registry import MODELS

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
TAP_COLOURS = ((0, 0, 255), (0, 200, 0), (255, 80, 0), (0, 200, 255))  # BGR per kernel tap


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Visualise the sampling of LIT DTM layers')
    parser.add_argument('config', help='config whose model.backbone (or model) is a LIT')
    parser.add_argument('checkpoint', help='official, converted or mmsparsevit checkpoint')
    parser.add_argument('image', help='input image')
    parser.add_argument('--out', required=True, help='output PNG')
    parser.add_argument('--stage', type=int, default=3,
                        help='stage whose DTM (the one opening it) is drawn: 1, 2 or 3')
    parser.add_argument('--grid', type=int, default=8,
                        help='draw a grid x grid subset of the output tokens')
    parser.add_argument('--device', default='cpu', help='device to run on')
    return parser.parse_args()


def build_backbone(config: str, checkpoint: str) -> Tuple[LIT, dict]:
    """Build the LIT of a detector/segmentor/backbone config with ``checkpoint`` loaded.
    Returns it with the config's data preprocessor settings (possibly empty)."""
    cfg = Config.fromfile(config)
    model_cfg = cfg.get('model')
    if model_cfg is None:
        raise SystemExit(f'{config}: no `model` in the config')
    backbone_cfg = model_cfg.get('backbone', model_cfg).copy()
    backbone_cfg['init_cfg'] = dict(type='Pretrained', checkpoint=checkpoint)
    backbone = MODELS.build(backbone_cfg)
    if not isinstance(backbone, LIT):
        raise SystemExit(f'{config}: the backbone is {type(backbone).__name__}, not LIT')
    backbone.init_weights()
    return backbone.eval(), dict(model_cfg.get('data_preprocessor') or {})


def sampling_points(offsets: torch.Tensor, input_stride: int) -> np.ndarray:
    """Image-pixel (y, x) of every tap of every output token.

    Args:
        offsets (Tensor): DTM offsets (2 * 4, Ho, Wo) of one image, (dy, dx) per 2x2 tap.
        input_stride (int): Stride of the DTM's input map with respect to the image.

    Returns:
        ndarray: (Ho, Wo, 4, 2) positions of the deformed taps.
    """
    _, out_h, out_w = offsets.shape
    rows = torch.arange(out_h).view(out_h, 1, 1) * 2
    cols = torch.arange(out_w).view(1, out_w, 1) * 2
    tap_y = torch.tensor([0, 0, 1, 1]).view(1, 1, 4)
    tap_x = torch.tensor([0, 1, 0, 1]).view(1, 1, 4)
    deltas = offsets.view(4, 2, out_h, out_w).permute(2, 3, 0, 1)
    feat_y = rows + tap_y + deltas[..., 0]
    feat_x = cols + tap_x + deltas[..., 1]
    # Pixel p of a stride-s map covers image pixels [p*s, (p+1)*s): its centre is (p+0.5)s-0.5.
    points = torch.stack([feat_y, feat_x], dim=-1)
    return ((points + 0.5) * input_stride - 0.5).numpy()


def draw(image: np.ndarray, points: np.ndarray, regular: np.ndarray, grid: int) -> np.ndarray:
    """Draw ``grid`` x ``grid`` tokens' taps (points/regular: (Ho, Wo, 4, 2)) on ``image``."""
    canvas = image.copy()
    out_h, out_w = points.shape[:2]
    radius = max(2, round(min(image.shape[:2]) / 150))
    for i in np.unique(np.linspace(0, out_h - 1, min(grid, out_h)).round().astype(int)):
        for j in np.unique(np.linspace(0, out_w - 1, min(grid, out_w)).round().astype(int)):
            centre = regular[i, j].mean(axis=0)
            cy, cx = int(round(centre[0])), int(round(centre[1]))
            for tap in range(4):
                ry, rx = regular[i, j, tap]
                py, px = points[i, j, tap]
                cv2.circle(canvas, (int(round(rx)), int(round(ry))), radius, (160, 160, 160), -1)
                cv2.line(canvas, (cx, cy), (int(round(px)), int(round(py))), TAP_COLOURS[tap], 1,
                         cv2.LINE_AA)
                cv2.circle(canvas, (int(round(px)), int(round(py))), radius, TAP_COLOURS[tap], -1,
                           cv2.LINE_AA)
            cv2.drawMarker(canvas, (cx, cy), (255, 255, 255), cv2.MARKER_CROSS, 3 * radius, 1)
    return canvas


def dtm_offsets(backbone: LIT, image_bgr: np.ndarray, preprocess: Dict,
                stage: int, device: str) -> torch.Tensor:
    """Run the backbone on the image and return the offsets of ``stage``'s DTM."""
    mean = np.array(preprocess.get('mean', IMAGENET_MEAN), dtype=np.float32)
    std = np.array(preprocess.get('std', IMAGENET_STD), dtype=np.float32)
    pixels = image_bgr[..., ::-1] if preprocess.get('bgr_to_rgb', True) else image_bgr
    tensor = torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1).copy())[None]
    captured = {}
    handle = backbone.stages[stage].downsample.conv_offset.register_forward_hook(
        lambda module, inputs, output: captured.setdefault('offsets', output.detach()))
    try:
        with torch.no_grad():
            backbone.to(device)(tensor.to(device))
    finally:
        handle.remove()
    return captured['offsets'][0].float().cpu()


def main() -> None:
    args = parse_args()
    image = cv2.imread(args.image, cv2.IMREAD_COLOR)
    if image is None:
        raise SystemExit(f'{args.image}: cannot read the image')
    backbone, preprocess = build_backbone(args.config, args.checkpoint)
    if not 1 <= args.stage < len(backbone.stages):
        raise SystemExit(f'--stage {args.stage}: DTM layers open stages 1..'
                         f'{len(backbone.stages) - 1}')
    offsets = dtm_offsets(backbone, image.astype(np.float32), preprocess, args.stage,
                          args.device)
    input_stride = backbone.patch_size * 2**(args.stage - 1)
    points = sampling_points(offsets, input_stride)
    regular = sampling_points(torch.zeros_like(offsets), input_stride)
    if not cv2.imwrite(args.out, draw(image, points, regular, args.grid)):
        raise SystemExit(f'{args.out}: cannot write the PNG')
    print(f'stage {args.stage} DTM sampling of {offsets.shape[1]}x{offsets.shape[2]} tokens '
          f'(mean |offset| {offsets.abs().mean():.3f} input pixels) -> {args.out}')


if __name__ == '__main__':
    main()
