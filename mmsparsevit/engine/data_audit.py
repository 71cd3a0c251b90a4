"""Report what mmdet's COCO loading silently drops, and stop on annotations it misreads.

mmdet's ``CocoDataset`` skips boxes of zero area or outside their image, annotations of
categories that are not in the dataset's classes and (with ``filter_empty_gt``) images
without annotations, all without a word. :func:`audit_coco_annotations` repeats those rules on the
annotation file and logs what they drop, naming the image files, and raises for a
``category_id`` the file does not define (a data error, not a class subset).
"""
import json
import logging
import os.path as osp
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

from mmengine.logging import print_log

from .transforms import DataCheckError

__all__ = ['audit_coco_annotations', 'audit_dataset']

# File names quoted per finding.
_MAX_QUOTED_FILES = 10


def _quote(files: Sequence[str]) -> str:
    shown = ', '.join(files[:_MAX_QUOTED_FILES])
    more = len(files) - _MAX_QUOTED_FILES
    return f'{shown}{f" and {more} more" if more > 0 else ""}'


def audit_coco_annotations(ann_file: str,
                           img_prefix: str = '',
                           classes: Optional[Sequence[str]] = None,
                           filter_empty_gt: bool = False) -> Dict[str, List[str]]:
    """Check a COCO annotation file the way mmdet's ``CocoDataset`` will read it.

    Args:
        ann_file (str): The COCO JSON file.
        img_prefix (str): Folder the ``file_name`` entries are relative to (for messages).
            Defaults to ''.
        classes (Sequence[str], optional): The dataset's classes; None means all categories
            of the file. Defaults to None.
        filter_empty_gt (bool): Whether the dataset drops images without boxes. Defaults to
            False.

    Returns:
        dict[str, list[str]]: Image files per finding: ``'zero_area'``, ``'outside_image'``,
        ``'partly_outside'``, ``'all_boxes_dropped'`` and ``'unannotated'`` (each also logged
        as a warning).

    Raises:
        DataCheckError: An annotation refers to an image or a category the file does not
            define; the message names the annotation file, the annotation id and the image.
    """
    with open(ann_file, encoding='utf-8') as f:
        content = json.load(f)
    images = {image['id']: image for image in content.get('images', [])}
    categories = {category['id']: category.get('name') for category in content['categories']}
    kept_categories = {cid for cid, name in categories.items()
                       if classes is None or name in classes}
    findings: Dict[str, List[str]] = defaultdict(list)
    annotated, kept_boxes = set(), set()
    for ann in content.get('annotations', []):
        image = images.get(ann.get('image_id'))
        if image is None:
            raise DataCheckError(f'{ann_file}: annotation {ann.get("id")} refers to image id '
                                 f'{ann.get("image_id")}, which the file does not list')
        image_file = osp.join(img_prefix, image['file_name'])
        if ann.get('category_id') not in categories:
            raise DataCheckError(
                f'{ann_file}: annotation {ann.get("id")} of image {image_file} has category_id '
                f'{ann.get("category_id")}, which is not among the file\'s categories '
                f'{sorted(categories)}')
        if ann['category_id'] not in kept_categories:
            continue
        annotated.add(image['id'])
        if ann.get('ignore', False):
            continue
        x1, y1, w, h = ann['bbox']
        inside_w = max(0, min(x1 + w, image['width']) - max(x1, 0))
        inside_h = max(0, min(y1 + h, image['height']) - max(y1, 0))
        if inside_w * inside_h == 0:
            findings['outside_image' if w >= 1 and h >= 1 else 'zero_area'].append(image_file)
            continue
        if ann.get('area', 0) <= 0 or w < 1 or h < 1:
            findings['zero_area'].append(image_file)
            continue
        if x1 < 0 or y1 < 0 or x1 + w > image['width'] or y1 + h > image['height']:
            findings['partly_outside'].append(image_file)
        kept_boxes.add(image['id'])
    # mmdet's filter_empty_gt keeps every image with an annotation of a kept class, even when
    # all of its boxes were dropped above; such images train as background.
    for image_id, image in images.items():
        if image_id not in annotated:
            findings['unannotated'].append(osp.join(img_prefix, image['file_name']))
        elif image_id not in kept_boxes:
            findings['all_boxes_dropped'].append(osp.join(img_prefix, image['file_name']))
    messages = {
        'zero_area': 'boxes of zero area (or under 1 px) are dropped, in',
        'outside_image': 'boxes entirely outside their image are dropped, in',
        'partly_outside': 'boxes reaching beyond their image are kept and clipped by the '
        'pipeline, in',
        'all_boxes_dropped': 'images lost all their boxes to the rules above and train as '
        'background:',
        'unannotated': ('images without annotations are left out of training:' if
                        filter_empty_gt else 'images without annotations train as background:'),
    }
    for finding, message in messages.items():
        files = sorted(set(findings[finding]))
        findings[finding] = files
        if files:
            print_log(f'{ann_file}: {len(files)} {message} {_quote(files)}', logger='current',
                      level=logging.WARNING)
    return dict(findings)


def _leaf_datasets(dataset):
    if hasattr(dataset, 'datasets'):
        for child in dataset.datasets:
            yield from _leaf_datasets(child)
    elif hasattr(dataset, 'dataset'):
        yield from _leaf_datasets(dataset.dataset)
    else:
        yield dataset


def audit_dataset(dataset) -> None:
    """Run :func:`audit_coco_annotations` on every COCO-style dataset inside ``dataset``.

    Args:
        dataset: A built dataset, possibly wrapped (Repeat/Concat/ClassBalanced datasets).
    """
    for leaf in _leaf_datasets(dataset):
        ann_file = getattr(leaf, 'ann_file', '')
        if getattr(leaf, 'COCOAPI', None) is None or not ann_file or not osp.isfile(ann_file):
            continue
        filter_cfg = getattr(leaf, 'filter_cfg', None) or {}
        audit_coco_annotations(
            ann_file,
            img_prefix=(getattr(leaf, 'data_prefix', None) or {}).get('img', ''),
            classes=leaf.metainfo.get('classes'),
            filter_empty_gt=bool(filter_cfg.get('filter_empty_gt')) and not leaf.test_mode)
