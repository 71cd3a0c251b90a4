"""The runtime of ``tools/train.py`` and ``tools/test.py``.

What the tools share (:mod:`.cli`), the checks they run before a runner is built
(:mod:`.preflight`), the failure behaviour they give every config (:mod:`.hardening`) and the
choice of the checkpoint ``--resume`` continues from (:mod:`.resume`). Every change the
hardening makes is logged when a run starts (:mod:`.config_diff`).

Layer: the top one; may import every other layer, and nothing in the package imports it.
"""
from .hardening import harden_test_config, harden_train_config
from .preflight import (ConfigCheckError, backbone_out_channels, check_backbone_channels,
                        check_config, check_dataset, describe_data_error)
from .resume import ResumeError, checkpoint_problem, find_resumable_checkpoint

__all__ = [
    'ConfigCheckError', 'ResumeError', 'backbone_out_channels', 'check_backbone_channels',
    'check_config', 'check_dataset', 'checkpoint_problem', 'describe_data_error',
    'find_resumable_checkpoint', 'harden_test_config', 'harden_train_config'
]
