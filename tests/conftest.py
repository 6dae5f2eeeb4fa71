import logging
import os

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


def pytest_runtest_logreport(report):
    """With COMPILE_NORM_FAILURE_LOG set (the GPU runs), each failure's traceback is appended
    to that file as it happens: a run killed by its time limit still says why tests failed."""
    path = os.environ.get("COMPILE_NORM_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext[-6000:]}\n")
