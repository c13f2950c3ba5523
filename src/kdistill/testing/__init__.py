"""Helpers for testing kdistill and code built on it: tiny models (and, later, contract suites)."""

from .models import TinyCNN as TinyCNN
from .models import TinyMLP as TinyMLP
from .models import tiny_cnn as tiny_cnn
from .models import tiny_mlp as tiny_mlp

__all__ = ["TinyCNN", "TinyMLP", "tiny_cnn", "tiny_mlp"]
