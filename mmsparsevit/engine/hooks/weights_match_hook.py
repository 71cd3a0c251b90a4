"""Check a checkpoint against the model when ``load_from`` or ``--resume`` loads it."""
from mmengine.hooks import Hook
from mmengine.model import BaseTTAModel, is_model_wrapper

from ..weights_match import match_checkpoint_to_model
from ...registry import HOOKS

__all__ = ['WeightsMatchHook']


@HOOKS.register_module()
class WeightsMatchHook(Hook):
    """Convert a checkpoint being loaded to the model's layout and check that it fits.

    See :func:`~mmsparsevit.engine.weights_match.match_checkpoint_to_model`.
    ``tools/test.py`` adds it with ``allow_partial=False`` (weights that stay unloaded stop the
    evaluation), ``tools/train.py`` with ``allow_partial=True`` (a ``load_from`` that fits
    only partly, e.g. a detector of another dataset, warns once with the counts).

    Args:
        allow_partial (bool): Warn instead of stopping when model weights stay unloaded.
            Defaults to False.
    """

    priority = 'VERY_HIGH'

    def __init__(self, allow_partial: bool = False) -> None:
        self.allow_partial = allow_partial

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        model = runner.model
        # What mmengine's load_state_dict loads into: inside DDP and test-time-aug wrappers.
        while is_model_wrapper(model) or isinstance(model, BaseTTAModel):
            model = model.module
        source = runner.cfg.get('load_from') or 'the checkpoint'
        match_checkpoint_to_model(model, checkpoint, source=str(source),
                                  allow_partial=self.allow_partial)
