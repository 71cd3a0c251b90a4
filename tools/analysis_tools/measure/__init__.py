"""What the cost tools of ``tools/analysis_tools`` share: exact FLOP counting, building the
measured model, benchmarking and the preset backbones.

A helper package of the tools, not part of the installed library: the scripts import it as
``measure`` (a script's own folder is on ``sys.path``), the tests through a path entry of
``tests/conftest.py``.
"""
from .flops import (Complexity, FlopCount, count_parameters, counting_flops, format_count,
                    measure_complexity)
from .model_builder import (build_model, is_full_model, load_model_spec, select_backbone,
                            synthetic_batch)
from .presets import BACKBONE_PRESETS, CURVE_PRESETS

__all__ = [
    'BACKBONE_PRESETS', 'CURVE_PRESETS', 'Complexity', 'FlopCount', 'build_model',
    'count_parameters', 'counting_flops', 'format_count', 'is_full_model', 'load_model_spec',
    'measure_complexity', 'select_backbone', 'synthetic_batch'
]
