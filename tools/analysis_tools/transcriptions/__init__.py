"""Plain PyTorch transcriptions of the backbones' math, with the authors' parameter names.

Each model here is written straight from the method's equations, the way a reader of the
paper would first write it: no cached position terms, no custom autograd functions, no
chunking, no fused attention. They share no code with :mod:`mmsparsevit.models`, so they
serve two purposes:

* **reference**: their state dicts have the official checkpoint layout, so the tests load
  them into our backbones through the converters and require equal outputs;
* **baseline**: ``tools/analysis_tools/benchmark_targets.py`` times our backbones against
  them (the "no more than 10 % slower than a plain transcription" target; the pairs with
  shared weights are built by ``measure.pairs``).

They live beside the tools, outside the installed package: the tests reach them through a
path entry of ``tests/conftest.py``, the tools because a script's folder is on ``sys.path``.
"""
from .kvt import mask_scatter_knn_attention, plain_knn_backbone, threshold_knn_attention
from .lit import PlainLIT, PlainLITTi
from .vvt import PlainVVT

__all__ = [
    'PlainLIT', 'PlainLITTi', 'PlainVVT', 'mask_scatter_knn_attention', 'plain_knn_backbone',
    'threshold_knn_attention'
]
