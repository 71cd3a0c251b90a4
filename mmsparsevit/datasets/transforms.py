"""A pipeline check that stops on a sample whose files disagree with each other."""
from typing import Dict, Optional

import numpy as np
from mmcv.transforms import BaseTransform

from ..registry import TRANSFORMS
from .data_checks import DataCheckError

__all__ = ['CheckLoadedSample']

# Distinct bad label values quoted in a message.
_MAX_QUOTED_VALUES = 10


@TRANSFORMS.register_module()
class CheckLoadedSample(BaseTransform):
    """Check a freshly loaded sample; raise :class:`DataCheckError` naming the file.

    Placed after ``LoadAnnotations`` (``tools/train.py`` inserts it into every pipeline),
    it compares what was read from disk with what the annotations promise:

    - the decoded image has the ``height`` x ``width`` recorded in the annotation file (COCO
      boxes are in those coordinates; a different image size would misplace every box);
    - a segmentation map has the image's size (mmseg's crops and flips would silently cut
      different regions of the two);
    - a segmentation map holds only class indices ``0 .. num_classes - 1`` and
      ``ignore_index`` after ``reduce_zero_label``/``label_map`` (anything else crashes the
      loss on a GPU with a device-side assert, or trains on a wrong class).

    Args:
        num_classes (int, optional): Number of segmentation classes; None skips the label
            check. Defaults to None.
        ignore_index (int): The label that is not trained on. Defaults to 255.
    """

    def __init__(self, num_classes: Optional[int] = None, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def transform(self, results: Dict) -> Dict:
        image = results.get('img_path', '<in-memory image>')
        loaded = results.get('ori_shape')
        recorded = (results.get('height'), results.get('width'))
        if loaded is not None and None not in recorded and tuple(loaded[:2]) != recorded:
            raise DataCheckError(
                f'image {image} is {loaded[0]}x{loaded[1]} (height x width) but its annotation '
                f'records {recorded[0]}x{recorded[1]}; the boxes would not fit the image')
        seg_map = results.get('gt_seg_map')
        if seg_map is None:
            return results
        seg_path = results.get('seg_map_path', '<in-memory map>')
        if loaded is not None and tuple(seg_map.shape[:2]) != tuple(loaded[:2]):
            raise DataCheckError(
                f'segmentation map {seg_path} is {seg_map.shape[0]}x{seg_map.shape[1]} but its '
                f'image {image} is {loaded[0]}x{loaded[1]} (height x width); they must have the '
                'same size')
        if self.num_classes is not None:
            values = np.unique(seg_map)
            bad = values[(values >= self.num_classes) & (values != self.ignore_index)]
            bad = np.concatenate([values[values < 0], bad])
            if bad.size:
                raise DataCheckError(
                    f'segmentation map {seg_path} holds labels {bad[:_MAX_QUOTED_VALUES].tolist()}'
                    f' outside the {self.num_classes} classes (valid: 0..{self.num_classes - 1}, '
                    f'{self.ignore_index} = ignored; counted after reduce_zero_label/label_map)')
        return results

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(num_classes={self.num_classes}, '
                f'ignore_index={self.ignore_index})')
