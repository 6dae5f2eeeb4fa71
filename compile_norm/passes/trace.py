"""What the passes tell torch's own logging, the way torch.compile users already read it.

- ``TORCH_LOGS="compile_norm"``: each pass's summary (sites rewritten, sites left unfused and
  why) at INFO; ``TORCH_LOGS="+compile_norm"`` adds the DEBUG lines (each lowering choice) and
  the ``compile_norm_graphs`` artifact, the post-grad graph before the passes and after each.
  From Python: ``torch._logging.set_logs(modules={"compile_norm": logging.DEBUG})``.
- ``TORCH_TRACE=<dir>`` (the structured trace ``tlparse`` reads): the same graphs as
  ``compile_norm_<stage>_graph`` artifacts and each graph's pass results as the
  ``compile_norm_pass_results`` artifact (JSON; also when a compile cache brought them back).

``register()`` names the log and the artifact in torch's registry (``torch._logging._internal``,
as torch's own ``_registrations.py`` does for its parts) when the package is imported. (torch
reads ``TORCH_LOGS`` when it is imported, before this package: there ``compile_norm`` is found
as a module name, and the artifact comes with ``+compile_norm``.)
"""

from __future__ import annotations

import json
import logging
from typing import Sequence

import torch

LOG = "compile_norm"  # the TORCH_LOGS name: the package's loggers, compile_norm.*
GRAPHS_ARTIFACT = "compile_norm_graphs"
RESULTS_ARTIFACT = "compile_norm_pass_results"


def register() -> None:
    from torch._logging import _internal

    _internal.register_log(LOG, [LOG])
    _internal.register_artifact(
        GRAPHS_ARTIFACT, "compile_norm: the post-grad graph before its passes and after each one"
    )


register()
graphs_log = torch._logging.getArtifactLogger(__name__, GRAPHS_ARTIFACT)


def _graph_text(graph: torch.fx.Graph) -> str:
    gm = graph.owning_module
    if isinstance(gm, torch.fx.GraphModule):
        return gm.print_readable(print_output=False, include_stride=True, include_device=True)
    return str(graph)


def stage(name: str, graph: torch.fx.Graph) -> None:
    """The graph after stage ``name`` ("input": before any pass), to the debug log and the trace."""
    if graphs_log.isEnabledFor(logging.DEBUG):
        graphs_log.debug("compile_norm graph after %s:\n%s", name, _graph_text(graph))
    torch._logging.trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": f"compile_norm_{name}_graph", "encoding": "string"},
        payload_fn=lambda: _graph_text(graph),
    )


def results(results: Sequence, cached: bool) -> None:
    """One graph's pass results (``PassResult``s) to the trace; ``cached``: from a cache hit."""
    torch._logging.trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": RESULTS_ARTIFACT, "encoding": "json"},
        payload_fn=lambda: json.dumps({"from_cache": cached, "passes": [r.to_dict() for r in results]}),
    )
