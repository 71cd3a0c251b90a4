# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Generate the embedded demo datasets: synthetic shapes on textured backgrounds.

Two datasets are written, both small enough to train on a CPU in minutes:

* ``<out-dir>/coco``: COCO-format instance detection/segmentation::

      coco/annotations/instances_{train,val}.json
      coco/{train,val}/000000.jpg ...

  Every object is a circle, square or triangle (category ids 1, 2, 3) with its
  instance mask as a polygon, its box and its area.

* ``<out-dir>/ade``: ADE20K-format semantic segmentation::

      ade/images/{training,validation}/000000.jpg ...
      ade/annotations/{training,validation}/000000.png ...

  As in ADE20K, annotation value 0 means "unlabelled" (thin bands on object
  borders, where anti-aliasing mixes colours) and values 1..4 are the classes
  background, circle, square, triangle; configs load it with
  ``reduce_zero_label=True``.

The output depends only on the arguments: the same seed gives byte-identical
files. A run whose output already exists with the same arguments does nothing.

Example:
    python tools/dataset_converters/make_demo_data.py --out-dir data/demo
"""
import argparse
import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

CLASSES = ('circle', 'square', 'triangle')
SEG_CLASSES = ('background', ) + CLASSES
SEG_PALETTE = ((120, 120, 120), (220, 20, 60), (0, 150, 255), (250, 200, 0))
COCO_SPLITS = ('train', 'val')
ADE_SPLITS = ('training', 'validation')
MANIFEST = 'demo_data.json'
IGNORE_BAND = 1
JPEG_QUALITY = 95
# Seed offsets keep the splits and the two datasets independent of each other.
_SPLIT_SEED_OFFSET = {'train': 0, 'val': 1, 'training': 2, 'validation': 3}

Polygon = np.ndarray  # (N, 2) float32 vertices, image coordinates


def textured_background(rng: np.random.RandomState, size: int) -> np.ndarray:
    """Draw a smooth colour field overlaid with stripes and pixel noise.

    Args:
        rng (np.random.RandomState): Random state to draw from.
        size (int): Side length of the square image.

    Returns:
        np.ndarray: ``(size, size, 3)`` float32 BGR image in [0, 255].
    """
    grid = rng.randint(2, 6)
    coarse = rng.uniform(40, 215, size=(grid, grid, 3)).astype(np.float32)
    image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(6, 24)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    image += rng.uniform(5, 25) * stripes[..., None]
    image += rng.normal(0, rng.uniform(4, 14), size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255)


def shape_polygon(rng: np.random.RandomState, category: str, center: Tuple[float, float],
                  radius: float) -> Polygon:
    """Return the outline of one shape as a polygon.

    Args:
        rng (np.random.RandomState): Random state for the rotation.
        category (str): One of :data:`CLASSES`.
        center (tuple[float, float]): ``(x, y)`` centre of the shape.
        radius (float): Circumradius in pixels.

    Returns:
        np.ndarray: ``(N, 2)`` float32 vertices.
    """
    if category == 'circle':
        angles = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    elif category == 'square':
        angles = rng.uniform(0, np.pi / 2) + np.arange(4) * np.pi / 2
    elif category == 'triangle':
        angles = rng.uniform(0, 2 * np.pi / 3) + np.arange(3) * 2 * np.pi / 3
    else:
        raise ValueError(f'unknown shape category {category!r}; expected one of {CLASSES}')
    vertices = np.stack([np.cos(angles), np.sin(angles)], axis=1) * radius
    return (vertices + np.asarray(center)).astype(np.float32)


def polygon_area(polygon: Polygon) -> float:
    """Shoelace area of a simple polygon."""
    x, y = polygon[:, 0], polygon[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def place_shapes(rng: np.random.RandomState, size: int, max_objects: int,
                 min_radius: float, max_radius: float) -> List[Tuple[str, Polygon]]:
    """Choose non-overlapping shapes that lie fully inside the image.

    Args:
        rng (np.random.RandomState): Random state to draw from.
        size (int): Side length of the square image.
        max_objects (int): At most this many shapes (at least one).
        min_radius (float): Smallest circumradius in pixels.
        max_radius (float): Largest circumradius in pixels.

    Returns:
        list[tuple[str, np.ndarray]]: ``(category, polygon)`` per shape.
    """
    wanted = rng.randint(1, max_objects + 1)
    placed: List[Tuple[str, Polygon, Tuple[float, float], float]] = []
    for _ in range(wanted * 20):
        if len(placed) == wanted:
            break
        radius = rng.uniform(min_radius, max_radius)
        center = tuple(rng.uniform(radius + 1, size - radius - 1, size=2))
        # Circumcircles two pixels apart guarantee disjoint shapes and masks.
        if any(np.hypot(center[0] - c[0], center[1] - c[1]) < radius + r + 2
               for _, _, c, r in placed):
            continue
        category = CLASSES[rng.randint(len(CLASSES))]
        placed.append((category, shape_polygon(rng, category, center, radius), center, radius))
    return [(category, polygon) for category, polygon, _, _ in placed]


def contrasting_colour(rng: np.random.RandomState, background: np.ndarray) -> np.ndarray:
    """Pick a fill colour that differs clearly from the mean background colour."""
    mean = background.reshape(-1, 3).mean(axis=0)
    for _ in range(50):
        colour = rng.uniform(0, 255, size=3)
        if np.linalg.norm(colour - mean) > 110:
            return colour
    return 255 - mean


def render_sample(rng: np.random.RandomState, size: int, max_objects: int
                  ) -> Tuple[np.ndarray, List[Tuple[str, Polygon]], np.ndarray]:
    """Render one image with its shapes and an ADE20K-style label map.

    Args:
        rng (np.random.RandomState): Random state to draw from.
        size (int): Side length of the square image.
        max_objects (int): At most this many shapes per image.

    Returns:
        tuple: ``(image, shapes, label_map)``: uint8 BGR image, the
        ``(category, polygon)`` list and a uint8 label map (0 unlabelled,
        1 background, 2.. the shape classes in :data:`CLASSES` order).
    """
    image = textured_background(rng, size)
    shapes = place_shapes(rng, size, max_objects, min_radius=size * 0.08,
                          max_radius=size * 0.22)
    label_map = np.ones((size, size), dtype=np.uint8)
    for category, polygon in shapes:
        mask = np.zeros((size, size), dtype=np.uint8)
        # cv2 draws with integer vertices; 4 fractional bits keep sub-pixel accuracy.
        cv2.fillPoly(mask, [np.round(polygon * 16).astype(np.int32)], 1, lineType=cv2.LINE_8,
                     shift=4)
        fill = contrasting_colour(rng, image) + rng.normal(0, 8, size=image.shape)
        image = np.where(mask[..., None] > 0, fill, image)
        label_map[mask > 0] = CLASSES.index(category) + 2
        border = cv2.morphologyEx(mask, cv2.MORPH_GRADIENT,
                                  np.ones((2 * IGNORE_BAND + 1, ) * 2, np.uint8))
        label_map[border > 0] = 0
    image = cv2.GaussianBlur(np.clip(image, 0, 255).astype(np.float32), (3, 3), 0.6)
    return np.round(image).astype(np.uint8), shapes, label_map


def write_image(path: Path, image: np.ndarray) -> None:
    """Write a JPEG (colour image) or PNG (label map), failing loudly."""
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if path.suffix == '.jpg' else []
    if not cv2.imwrite(str(path), image, params):
        raise OSError(f'could not write {path}')


def make_coco_split(out_dir: Path, split: str, num_images: int, size: int, max_objects: int,
                    seed: int) -> Dict:
    """Write one COCO split (images and annotation file).

    Args:
        out_dir (Path): The dataset root (``.../coco``).
        split (str): ``'train'`` or ``'val'``.
        num_images (int): Number of images.
        size (int): Side length of the images.
        max_objects (int): At most this many shapes per image.
        seed (int): Base random seed.

    Returns:
        dict: The COCO annotation dictionary that was written.
    """
    rng = np.random.RandomState(seed * 10 + _SPLIT_SEED_OFFSET[split])
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        image, shapes, _ = render_sample(rng, size, max_objects)
        file_name = f'{image_id:06d}.jpg'
        write_image(out_dir / split / file_name, image)
        images.append(dict(id=image_id, file_name=file_name, height=size, width=size))
        for category, polygon in shapes:
            x0, y0 = polygon.min(axis=0)
            x1, y1 = polygon.max(axis=0)
            annotations.append(
                dict(
                    id=len(annotations) + 1,
                    image_id=image_id,
                    category_id=CLASSES.index(category) + 1,
                    segmentation=[np.round(polygon.reshape(-1), 2).tolist()],
                    area=round(polygon_area(polygon), 2),
                    bbox=[round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                    iscrowd=0))
    coco = dict(
        info=dict(description=f'mmsparsevit synthetic shapes ({split}, seed {seed})'),
        licenses=[],
        images=images,
        annotations=annotations,
        categories=[dict(id=i + 1, name=name, supercategory='shape')
                    for i, name in enumerate(CLASSES)])
    (out_dir / 'annotations').mkdir(parents=True, exist_ok=True)
    with open(out_dir / 'annotations' / f'instances_{split}.json', 'w', encoding='utf-8') as f:
        json.dump(coco, f)
    return coco


def make_ade_split(out_dir: Path, split: str, num_images: int, size: int, max_objects: int,
                   seed: int) -> None:
    """Write one ADE20K-format split (JPEG images and PNG label maps).

    Args:
        out_dir (Path): The dataset root (``.../ade``).
        split (str): ``'training'`` or ``'validation'``.
        num_images (int): Number of images.
        size (int): Side length of the images.
        max_objects (int): At most this many shapes per image.
        seed (int): Base random seed.
    """
    rng = np.random.RandomState(seed * 10 + _SPLIT_SEED_OFFSET[split])
    (out_dir / 'images' / split).mkdir(parents=True, exist_ok=True)
    (out_dir / 'annotations' / split).mkdir(parents=True, exist_ok=True)
    for index in range(num_images):
        image, _, label_map = render_sample(rng, size, max_objects)
        write_image(out_dir / 'images' / split / f'{index:06d}.jpg', image)
        write_image(out_dir / 'annotations' / split / f'{index:06d}.png', label_map)


def _up_to_date(root: Path, settings: Dict) -> bool:
    manifest = root / MANIFEST
    if not manifest.is_file():
        return False
    with open(manifest, encoding='utf-8') as f:
        return json.load(f) == settings


def make_demo_dataset(dataset: str, out_dir: Path, num_train: int = 400, num_val: int = 100,
                      size: int = 128, max_objects: int = 4, seed: int = 0) -> bool:
    """Write one demo dataset to ``out_dir``.

    Args:
        dataset (str): ``'coco'`` (instances) or ``'ade'`` (semantic, ADE20K layout).
        out_dir (Path): Dataset root; replaced if it holds other data.
        num_train (int): Training images. Defaults to 400.
        num_val (int): Validation images. Defaults to 100.
        size (int): Image side length. Defaults to 128.
        max_objects (int): Most shapes per image. Defaults to 4.
        seed (int): Random seed. Defaults to 0.

    Returns:
        bool: False when ``out_dir`` was already up to date, else True.
    """
    if dataset not in DATASET_SPLITS:
        raise ValueError(f'unknown demo dataset {dataset!r}; expected one of '
                         f'{tuple(DATASET_SPLITS)}')
    out_dir = Path(out_dir)
    settings = dict(dataset=dataset, num_train=num_train, num_val=num_val, size=size,
                    max_objects=max_objects, seed=seed)
    if _up_to_date(out_dir, settings):
        return False
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    (train_split, val_split), write_split = DATASET_SPLITS[dataset]
    write_split(out_dir, train_split, num_train, size, max_objects, seed)
    write_split(out_dir, val_split, num_val, size, max_objects, seed)
    # The manifest is written last: an interrupted run is redone next time.
    with open(out_dir / MANIFEST, 'w', encoding='utf-8') as f:
        json.dump(settings, f, indent=2)
    return True


DATASET_SPLITS = dict(coco=(COCO_SPLITS, make_coco_split), ade=(ADE_SPLITS, make_ade_split))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Generate the synthetic demo datasets')
    parser.add_argument('--out-dir', default='data/demo',
                        help='parent folder of coco/ and ade/ (default: data/demo)')
    parser.add_argument('--dataset', choices=('coco', 'ade', 'all'), default='all',
                        help='which dataset to write (default: all)')
    parser.add_argument('--num-train', type=int, default=400)
    parser.add_argument('--num-val', type=int, default=100)
    parser.add_argument('--size', type=int, default=128, help='image side length in pixels')
    parser.add_argument('--max-objects', type=int, default=4, help='most shapes per image')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    for name in ('num_train', 'num_val', 'max_objects'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be at least 1')
    if args.size < 32:
        parser.error('--size must be at least 32 pixels')
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    names = tuple(DATASET_SPLITS) if args.dataset == 'all' else (args.dataset, )
    for name in names:
        root = Path(args.out_dir) / name
        written = make_demo_dataset(name, root, num_train=args.num_train, num_val=args.num_val,
                                    size=args.size, max_objects=args.max_objects, seed=args.seed)
        print(f'{root}: {"written" if written else "up to date"}')


if __name__ == '__main__':
    main()
