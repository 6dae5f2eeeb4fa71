"""Pass results that survive compile-cache hits.

On a hit of Inductor's FX graph cache or AOTAutograd's cache the post-grad passes do not run,
so without help a warm compile reports nothing (empty counters, no log lines) for a graph the
cold compile fused. What a hit does bring back is the compiled graph's ``counter_deltas``:
every ``counters["inductor"]`` key the graph's compile added, replayed into
``counters["inductor"]`` by ``FxGraphCache.cache_hit_post_compile`` (for both caches).

So the pass manager stamps the results of every graph it rewrites into one such key
(``stamp``: the results as JSON behind ``CARRIER``); the key is stored with the compiled
artefact, in its cache entry. ``replaying()``, around the backend's compile, takes the keys
out of ``counters["inductor"]`` again and publishes the results of those a cache brought back
(the others were published when their passes ran) with the same counters and log lines.
Dynamo's compile lock serializes compiles, so a stamp and its arrival are matched by count.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections import Counter
from typing import Iterator, Sequence

from torch._dynamo.utils import counters

from . import trace
from .base import PassResult

log = logging.getLogger("compile_norm.passes")

CARRIER = "compile_norm pass results: "  # + JSON, a key of counters["inductor"]
_lock = threading.Lock()
_published: Counter = Counter()  # carrier key -> stamps whose results were published live


def carrier_key(results: Sequence[PassResult]) -> str:
    return CARRIER + json.dumps([r.to_dict() for r in results], sort_keys=True)


def parse_carrier(key: str) -> list[PassResult]:
    return [PassResult.from_dict(d) for d in json.loads(key[len(CARRIER):])]


def stamp(results: Sequence[PassResult]) -> None:
    """Record one graph's (already published) ``results`` with the graph being compiled."""
    key = carrier_key(results)
    with _lock:
        counters["inductor"][key] += 1
        _published[key] += 1


def drain() -> int:
    """Publish the results that arrived from a compile cache; returns how many graphs' results.
    Removes every carrier key from ``counters["inductor"]`` (they are only a vehicle)."""
    with _lock:
        group = counters["inductor"]
        arrived = {k: n for k, n in group.items() if k.startswith(CARRIER)}
        replays = []
        for key, n in arrived.items():
            del group[key]
            replays += [key] * max(0, n - _published[key])
        _published.clear()  # every stamp made so far is in ``arrived`` (or was cleared away)
    for key in replays:
        results = parse_carrier(key)
        log.info("compile_norm: a graph loaded from a compile cache; its pass results:")
        for result in results:
            result.publish()
        trace.results(results, cached=True)
    return len(replays)


@contextlib.contextmanager
def replaying() -> Iterator[None]:
    """Publish, when the block ends, the pass results a compile cache brought back in it."""
    try:
        yield
    finally:
        drain()
