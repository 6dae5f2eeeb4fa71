"""The graph inspection tool: what each compile_norm pass did to a model's graphs.

``inspect_model(model, example_inputs)`` compiles with the backend while observing every pass
stage and returns an ``InspectReport`` (``.to_text()``, ``.to_html()``, ``.to_json()``);
``compile-norm inspect`` is its command line.
"""

from .core import inspect_model
from .report import InspectReport

__all__ = ["InspectReport", "inspect_model"]
