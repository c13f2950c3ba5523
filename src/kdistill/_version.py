"""The kdistill version, in a module of its own so that any part of the package can read it."""

__all__ = ["__version__"]

__version__ = "0.1.0"
