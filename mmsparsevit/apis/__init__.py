"""Inference API: a config's detector or segmentor with a checkpoint's weights.

Layer: above ``engine`` (it checks the checkpoint against the model with its fit check); the
tools and users import it, no layer below does.
"""
from .inference import init_model, load_weights

__all__ = ['init_model', 'load_weights']
