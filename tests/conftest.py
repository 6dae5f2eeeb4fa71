import importlib.util
import logging
import os
import sys
import time

import pytest
import torch


class _DropTorchaoEnumNotice(logging.Filter):
    """torchao registers its KernelPreference enum as a pytree constant at import, and torch
    logs a deprecation notice about it: torchao's, not ours; kept out of the test output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is an Enum subclass and is now natively supported" not in record.getMessage()


logging.getLogger("torch.utils._pytree").addFilter(_DropTorchaoEnumNotice())

import compile_norm  # noqa: F401  (registers the ops)

# Compiles in tests take the lowering from the seed table, not from timing the GPU they run
# on (which would make a test's expected code depend on the card and its load, and cost 2-10 s
# per shape class); the measurement tests give themselves a budget.
os.environ.setdefault("COMPILE_NORM_MEASURE_BUDGET_S", "0")


def pytest_collection_finish(session):
    """Start the Triton interpreter children of the collected test files that have one
    (``helpers.interpreter_report``) on a background thread, so they run beside the serial
    tests (CI: two cores) instead of one after another in them. Not under xdist, whose
    workers each collect every file (and run in parallel already)."""
    if os.environ.get("PYTEST_XDIST_WORKER") or importlib.util.find_spec("triton") is None:
        return
    import helpers

    scripts, seen = [], set()
    for item in session.items:
        path = item.path
        if path in seen:
            continue
        seen.add(path)
        if path.suffix == ".py" and "interpreter_report(__file__" in path.read_text():
            scripts.append(str(path))
    if scripts:
        helpers.start_interpreter_reports(scripts)


def pytest_sessionfinish(session):
    if "helpers" in sys.modules:
        sys.modules["helpers"].stop_interpreter_reports()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _log(variable: str, text: str) -> None:
    """Append ``text`` to the file named by ``variable`` (GPU runs), once per run: under
    xdist only the controller writes (it sees every worker's reports)."""
    path = os.environ.get(variable)
    if path and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(path, "a") as f:
            f.write(text)


def pytest_runtest_logstart(nodeid, location):
    """COMPILE_NORM_PROGRESS_LOG: when each test starts, so a run cut by its time limit says
    which tests were still running."""
    _log("COMPILE_NORM_PROGRESS_LOG", f"{time.time():.1f} start {nodeid}\n")


def pytest_runtest_logreport(report):
    """COMPILE_NORM_FAILURE_LOG: each failure's traceback as it happens (a run killed by its
    time limit still says why tests failed); COMPILE_NORM_PROGRESS_LOG: each test's end."""
    if report.failed:
        _log("COMPILE_NORM_FAILURE_LOG", f"==== {report.nodeid} ({report.when})\n{report.longreprtext[-6000:]}\n")
    if report.when == "call" or report.failed:
        _log("COMPILE_NORM_PROGRESS_LOG", f"{time.time():.1f} {report.outcome} {report.duration:.1f}s {report.nodeid}\n")
