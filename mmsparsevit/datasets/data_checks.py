"""The data checks, in one place: one walk through dataset wrappers, one set of COCO rules.

mmdet's ``CocoDataset`` reads a file that breaks its assumptions deep inside its loader, and it
skips boxes of zero area or outside their image, annotations of categories that are not in the
dataset's classes and (with ``filter_empty_gt``) images without annotations, all without a
word. :func:`check_coco_file` holds the rules a COCO file must meet, whoever checks it (the
tools' pre-flight, :func:`audit_coco_annotations`); the audit then repeats mmdet's dropping
rules on the file and logs what they drop, naming the image files.
"""
import json
import logging
import os.path as osp
from collections import defaultdict
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from mmengine.logging import print_log

__all__ = [
    'DataCheckError', 'audit_coco_annotations', 'audit_dataset', 'check_coco_file',
    'leaf_datasets'
]

# File names quoted per finding.
_MAX_QUOTED_FILES = 10
# The fields mmdet's COCO loading reads from every entry of each list.
_COCO_FIELDS = dict(
    images=('id', 'file_name', 'height', 'width'),
    annotations=('id', 'image_id', 'category_id', 'bbox'),
    categories=('id', 'name'))


class DataCheckError(ValueError):
    """A sample or an annotation file is inconsistent; the message names the file."""


def _member(dataset: Any, name: str) -> Any:
    return dataset.get(name) if isinstance(dataset, dict) else getattr(dataset, name, None)


def leaf_datasets(dataset: Any, key: str = 'dataset') -> Iterator[Tuple[str, Any]]:
    """Walk through dataset wrappers to the datasets that read files.

    Wrappers hold one dataset (``RepeatDataset``, ``ClassBalancedDataset``,
    ``MultiImageMixDataset``: ``dataset``) or several (``ConcatDataset``: ``datasets``), as
    config keys or, once built, as attributes; both are walked alike.

    Args:
        dataset: A dataset config or a built dataset, possibly wrapped.
        key (str): How ``dataset`` is named in messages. Defaults to ``'dataset'``.

    Yields:
        tuple[str, Any]: Each leaf's key (e.g. ``'<key>.datasets[1].dataset'``) and the leaf.
    """
    inner = _member(dataset, 'dataset')
    children = _member(dataset, 'datasets')
    if inner is not None:
        yield from leaf_datasets(inner, f'{key}.dataset')
    elif children is not None:
        for index, child in enumerate(children):
            yield from leaf_datasets(child, f'{key}.datasets[{index}]')
    else:
        yield key, dataset


def check_coco_file(path: str,
                    classes: Optional[Sequence[str]] = None,
                    need_annotations: bool = True,
                    img_prefix: str = '') -> dict:
    """Check that ``path`` is a COCO annotation file that mmdet reads as intended.

    The rules:

    - the file is a JSON object with ``images`` and ``categories`` lists, and an
      ``annotations`` list when ``need_annotations``;
    - every entry has the fields mmdet reads: images ``id``, ``file_name``, ``height``,
      ``width``; annotations ``id``, ``image_id``, ``category_id``, ``bbox``; categories
      ``id``, ``name``;
    - every annotation refers to an image and a category that the file lists (mmdet drops a
      box of an unknown category without a word: a data error, not a class subset);
    - every name in ``classes`` is one of the file's categories (mmdet drops missing names
      without a word and shifts the labels of the rest).

    Args:
        path (str): The JSON file.
        classes (Sequence[str], optional): The dataset's class names. Defaults to None (not
            checked).
        need_annotations (bool): Whether an ``annotations`` list is required (test-dev style
            files list images only). Defaults to True.
        img_prefix (str): Folder the ``file_name`` entries are relative to (for messages).
            Defaults to ''.

    Returns:
        dict: The file's content.

    Raises:
        DataCheckError: Naming ``path`` and what is wrong.
    """
    where = f'{path} is not a COCO annotation file'
    try:
        with open(path, encoding='utf-8') as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataCheckError(f'{where}: it is not valid JSON ({err})') from None
    if not isinstance(content, dict):
        raise DataCheckError(f'{where}: its top level is a {type(content).__name__}, not an '
                             'object with "images", "annotations" and "categories"')
    required = [name for name in _COCO_FIELDS if need_annotations or name != 'annotations']
    missing = [name for name in required if not isinstance(content.get(name), list)]
    if missing:
        raise DataCheckError(f'{where}: it has no {", ".join(repr(m) for m in missing)} list '
                             f'(top-level keys: {sorted(content)[:10]})')
    if not isinstance(content.get('annotations'), list):
        content['annotations'] = []  # a test-dev style file lists images only
    for name, fields in _COCO_FIELDS.items():
        for index, entry in enumerate(content[name]):
            absent = [field for field in fields if field not in entry]
            if absent:
                raise DataCheckError(f'{where}: {name}[{index}] lacks {absent}')
    images = {image['id']: image for image in content['images']}
    categories = {category['id']: category['name'] for category in content['categories']}
    for ann in content['annotations']:
        image = images.get(ann['image_id'])
        if image is None:
            raise DataCheckError(f'{path}: annotation {ann["id"]} refers to image id '
                                 f'{ann["image_id"]}, which the file does not list')
        if ann['category_id'] not in categories:
            raise DataCheckError(
                f'{path}: annotation {ann["id"]} of image '
                f'{osp.join(img_prefix, image["file_name"])} has category_id '
                f'{ann["category_id"]}, which is not among the file\'s categories '
                f'{sorted(categories)}')
    names = list(categories.values())
    unknown = [name for name in classes or () if name not in names]
    if unknown:
        raise DataCheckError(
            f'{path} has no categories named {unknown[:10]} (it has {names[:10]}); set the '
            'dataset\'s metainfo.classes to the file\'s category names')
    return content


def _quote(files: Sequence[str]) -> str:
    shown = ', '.join(files[:_MAX_QUOTED_FILES])
    more = len(files) - _MAX_QUOTED_FILES
    return f'{shown}{f" and {more} more" if more > 0 else ""}'


def audit_coco_annotations(ann_file: str,
                           img_prefix: str = '',
                           classes: Optional[Sequence[str]] = None,
                           filter_empty_gt: bool = False) -> Dict[str, List[str]]:
    """Check a COCO annotation file and report what mmdet's ``CocoDataset`` will drop.

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
        DataCheckError: The file breaks a rule of :func:`check_coco_file`, e.g. an annotation
            refers to a category the file does not define; the message names the annotation
            file (and the annotation id and the image).
    """
    content = check_coco_file(ann_file, classes=classes, img_prefix=img_prefix)
    images = {image['id']: image for image in content['images']}
    kept_categories = {category['id'] for category in content['categories']
                       if classes is None or category['name'] in classes}
    findings: Dict[str, List[str]] = defaultdict(list)
    annotated, kept_boxes = set(), set()
    for ann in content['annotations']:
        if ann['category_id'] not in kept_categories:
            continue
        image = images[ann['image_id']]
        image_file = osp.join(img_prefix, image['file_name'])
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


def audit_dataset(dataset) -> None:
    """Run :func:`audit_coco_annotations` on every COCO-style dataset inside ``dataset``.

    Args:
        dataset: A built dataset, possibly wrapped (Repeat/Concat/ClassBalanced datasets).
    """
    for _, leaf in leaf_datasets(dataset):
        ann_file = getattr(leaf, 'ann_file', '')
        if getattr(leaf, 'COCOAPI', None) is None or not ann_file or not osp.isfile(ann_file):
            continue
        filter_cfg = getattr(leaf, 'filter_cfg', None) or {}
        audit_coco_annotations(
            ann_file,
            img_prefix=(getattr(leaf, 'data_prefix', None) or {}).get('img', ''),
            classes=leaf.metainfo.get('classes'),
            filter_empty_gt=bool(filter_cfg.get('filter_empty_gt')) and not leaf.test_mode)
