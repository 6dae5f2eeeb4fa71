"""Parts of the pass manager's cache key (``CompileNormPass.uuid()``) that are not options or
provider state: the hash of the package sources that shape the compiled graph, Triton's
version, and the hash of the whole state, each computed once.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import pathlib

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parent.parent
# The package parts whose code shapes the compiled graph. Not inspect/ or cli.py (they watch
# and drive compiles), fuse.py or __init__.py (a torch.compile wrapper, imports).
GRAPH_SOURCES = ("passes", "ops", "lowerings", "kernels", "options.py", "backend.py")
SOURCE_SUFFIXES = (".py", ".c", ".cu", ".cpp")


def graph_source_files() -> list[pathlib.Path]:
    """The source files of ``GRAPH_SOURCES``."""
    files: list[pathlib.Path] = []
    for part in GRAPH_SOURCES:
        path = PACKAGE_ROOT / part
        files += [path] if path.is_file() else path.rglob("*")
    return sorted(p for p in files if p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts)


@functools.cache
def source_hash() -> str:
    """Hash of ``graph_source_files()``: read once per process, as the code running is."""
    h = hashlib.sha256()
    for path in graph_source_files():
        h.update(str(path.relative_to(PACKAGE_ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@functools.cache
def triton_version() -> str | None:
    """The installed Triton's version, from its metadata: importing triton is slow, and is
    not wanted where there is no GPU."""
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=64)
def hash_state(state: tuple) -> str:
    """The hex digest of ``state`` (a tuple of strings, numbers and such tuples), computed once
    per distinct state."""
    return hashlib.sha256(repr(state).encode()).hexdigest()
