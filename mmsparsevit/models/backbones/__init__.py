from .lit import LIT

__all__ = ['LIT']
