"""Runnable demos behind ``kdistill demo``: MNIST (Hinton et al.'s table) and an LLM distillation.

Not imported by ``import kdistill``: they need the ``[demo]`` (or ``[demo-llm]``) extra.
"""

__all__: list[str] = []
