"""One instance per distinct graph in a process that receives graphs.

Why: a graph travels inside every request's task, and Dask unpickles each
task on the scheduler (and again on the worker), so a scheduler serving one
model held one copy of its graph -- tens of objects -- per request in
flight and per message in Dask's logs of recent messages (the last 1,000
per stream).  Python's full garbage collections grew with them: 100-180 ms
pauses of the scheduler, which were the closed loop's p99 (issue 20).  A
graph now pickles as the bytes of its description, and loading those bytes
returns the instance already loaded from the same bytes, so a process keeps
one graph per distinct description, however many requests carry it.

A loaded instance keeps its bytes, so pickling it again (the scheduler
sending the task on to a worker) costs nothing; building on it with the
graph's methods drops them (and its place in the cache), so a changed graph
is never sent as the old one.
"""

from __future__ import annotations

import pickle
import threading
from collections import OrderedDict
from typing import Any

#: Distinct graph descriptions kept loaded per process (least recently used
#: out; an evicted one is loaded again from its bytes when it comes back).
MAX_SHARED = 256
BLOB = "_shared_blob"

_lock = threading.Lock()
_loaded: OrderedDict[bytes, Any] = OrderedDict()
#: Off, a graph pickles as its full state and every load makes a new
#: instance, as before issue 20 (the closed-loop bench's "old" mode).
SHARE = True


def reduce_graph(graph: Any) -> tuple[Any, tuple[Any]]:
    """What ``KernelGraph.__reduce__`` returns."""
    if SHARE:
        return (load_graph, (graph_blob(graph),))
    return (_new_graph, ({k: v for k, v in graph.__dict__.items() if not k.startswith("_")},))


def graph_blob(graph: Any) -> bytes:
    """The bytes ``graph`` pickles as: its state without caches (names
    starting with ``_``), buffers without their owner."""
    blob = graph.__dict__.get(BLOB)
    if blob is not None:
        return blob
    state = {k: v for k, v in graph.__dict__.items() if not k.startswith("_")}
    try:
        return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, AttributeError, TypeError):
        import cloudpickle  # kernels defined in __main__ or as closures

        return cloudpickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)


def load_graph(blob: bytes) -> Any:
    """The graph described by ``blob``: the instance loaded from the same
    bytes before, if it is unchanged, else a new one (then kept)."""
    with _lock:
        graph = _loaded.get(blob)
        if graph is not None and BLOB in graph.__dict__:  # not changed since
            _loaded.move_to_end(blob)
            return graph
    graph = _new_graph(pickle.loads(blob))
    graph.__dict__[BLOB] = blob
    with _lock:
        _loaded[blob] = graph
        _loaded.move_to_end(blob)
        while len(_loaded) > MAX_SHARED:
            _loaded.popitem(last=False)
    return graph


def _new_graph(state: dict[str, Any]) -> Any:
    from .graph import KernelGraph

    graph = KernelGraph.__new__(KernelGraph)
    graph.__dict__.update(state)
    for buf in graph.buffers.values():
        object.__setattr__(buf, "owner", graph)
    return graph


def forget_blob(graph: Any) -> None:
    """``graph`` is being changed: it is no longer what its bytes say."""
    graph.__dict__.pop(BLOB, None)
