from .data_audit_hook import DataAuditHook
from .non_finite_loss_hook import NonFiniteLossError, NonFiniteLossHook
from .random_state_hook import RandomStateHook
from .weights_match_hook import WeightsMatchHook

__all__ = [
    'DataAuditHook', 'NonFiniteLossError', 'NonFiniteLossHook', 'RandomStateHook',
    'WeightsMatchHook'
]
