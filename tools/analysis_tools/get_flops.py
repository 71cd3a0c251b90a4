r"""Parameters and FLOPs of a backbone or a detector/segmentor.

One multiply-add is one FLOP. Counted: convolutions, torchvision deformable convolutions (as
convolutions), linear layers and every matrix product, so attention matrix products
(softmax, vicinity/linear and k-NN attention) are included; normalisation, softmax,
activations and other element-wise ops are not (``--convention fvcore`` adds fvcore's
estimates for norms, up-sampling and pooling). Full models run in ``mode='tensor'``
(backbone, neck, heads; no data preprocessor or post-processing). Counting is torch's
``FlopCounterMode`` (see measure/flops.py); mmcv's deformable convolutions are invisible to it
and are named in a warning, not counted.

Examples::

    python tools/analysis_tools/get_flops.py --backbone swin-t --shape 224
    python tools/analysis_tools/get_flops.py --backbone "dict(type='mmsparsevit.VVT')"
    python tools/analysis_tools/get_flops.py configs/retinanet/retinanet_vvt-s_fpn_1x_coco.py \
        --shape 800 1280
    python tools/analysis_tools/get_flops.py configs/fpn/fpn_vvt-s_4xb4-80k_ade20k-512x512.py \
        --shape 512 --backbone-only
"""
import argparse
import json

from mmengine.config import DictAction

from measure import (BACKBONE_PRESETS, build_model, format_count, load_model_spec,
                     measure_complexity, select_backbone)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Count parameters and FLOPs of a model.')
    parser.add_argument('config', nargs='?', help='config file (mmdet, mmseg or backbone)')
    parser.add_argument(
        '--backbone',
        help=f'a backbone instead of a config: a preset ({", ".join(BACKBONE_PRESETS)}) '
        'or a dict literal, e.g. "dict(type=\'mmsparsevit.LIT\', arch=\'tiny\')"')
    parser.add_argument(
        '--shape', type=int, nargs='+', default=[224], help='input size: H W, or one side')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument(
        '--backbone-only', action='store_true', help='count only the backbone of a full model')
    parser.add_argument('--convention', choices=('products', 'fvcore'), default='products')
    parser.add_argument(
        '--no-meta',
        action='store_true',
        help='count on a real CPU forward pass (default: shape-only meta pass when possible)')
    parser.add_argument(
        '--depth', type=int, default=1, help='module depth of the per-module breakdown')
    parser.add_argument('--json', help='also write the result to this JSON file')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction, help='override config settings')
    args = parser.parse_args(argv)
    if len(args.shape) not in (1, 2) or min(args.shape) <= 0:
        parser.error(f'--shape takes one or two positive sizes, got {args.shape}')
    if (args.config is None) == (args.backbone is None):
        parser.error('give a config file or --backbone (exactly one)')
    return args


def main(argv=None):
    args = parse_args(argv)
    shape = tuple(args.shape) * (2 // len(args.shape))
    model_cfg, scope = load_model_spec(args.config, args.backbone, args.cfg_options)
    model = select_backbone(build_model(model_cfg, scope), args.backbone_only)
    result = measure_complexity(
        model, shape, args.batch_size, args.convention, use_meta=not args.no_meta)

    source = args.config or args.backbone
    part = 'backbone of ' if args.backbone_only else ''
    print(f'{part}{source}')
    print(f'input: {args.batch_size}x3x{shape[0]}x{shape[1]}  '
          f'(counted on {result.device}, convention: {args.convention})')
    print(f'params: {format_count(result.params, "M")}  ({result.params:,})')
    print(f'FLOPs:  {format_count(result.flops)}  ({result.flops:,} multiply-adds)')
    print('by op:')
    for op, flops in sorted(result.by_op.items(), key=lambda item: -item[1]):
        print(f'  {op:<50} {format_count(flops):>12}  {100 * flops / result.flops:5.1f} %')
    print(f'by module (depth {args.depth}):')
    for name, flops in result.module_breakdown(args.depth).items():
        print(f'  {name:<50} {format_count(flops):>12}  {100 * flops / result.flops:5.1f} %')
    if args.json:
        with open(args.json, 'w') as file:
            json.dump(
                dict(
                    source=source,
                    backbone_only=args.backbone_only,
                    shape=list(shape),
                    batch_size=args.batch_size,
                    convention=args.convention,
                    params=result.params,
                    flops=result.flops,
                    by_op=result.by_op,
                    by_module=result.by_module),
                file,
                indent=2)


if __name__ == '__main__':
    main()
