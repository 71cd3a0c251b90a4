from .data_audit_hook import DataAuditHook
from .non_finite_loss_hook import NonFiniteLossError, NonFiniteLossHook

__all__ = ['DataAuditHook', 'NonFiniteLossError', 'NonFiniteLossHook']
