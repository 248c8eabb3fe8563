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

A loaded instance is shared, so it is read-only: its builder methods and
attribute assignment refuse (``copy.deepcopy`` gives an independent graph
to build on), and it keeps its bytes, so sending it on (the scheduler
passing the task to a worker) costs nothing.  A cached instance is reused
only while every array kernel's function is still the one its module
exports (``client.upload_file`` reloads modules on workers), and the graph
a user builds is pickled afresh at every send, so no request runs a graph
other than the one it was submitted with.
"""

from __future__ import annotations

import pickle
import sys
import threading
from collections import OrderedDict
from typing import Any

#: Distinct graph descriptions kept loaded per process, and their bytes
#: (least recently used out; an evicted one is loaded again when it comes back).
MAX_SHARED = 256
MAX_SHARED_BYTES = 64 << 20
BLOB = "_shared_blob"
#: what a loaded instance's bytes describe: name, n_iter, buffer and launch counts
STAMP = "_shared_stamp"
#: (kernel, module, qualname) of a loaded instance's functions imported by name
BY_NAME = "_shared_by_name"

_lock = threading.Lock()
_loaded: OrderedDict[bytes, Any] = OrderedDict()
_loaded_bytes = 0
#: Off, a graph pickles as its full state and every load makes a new
#: instance, as before issue 20 (the closed-loop bench's "old" mode).
SHARE = True


def reduce_graph(graph: Any) -> tuple[Any, tuple[Any, ...]]:
    """What ``KernelGraph.__reduce__`` returns."""
    from .graph import KernelGraph

    if SHARE and type(graph) is KernelGraph:
        return (load_graph, (graph_blob(graph),))
    return (_new_graph, (dict(graph.__dict__), type(graph)))


def _stamp(graph: Any) -> tuple:
    return (graph.name, graph.n_iter, len(graph.buffers), len(graph.launches))


def is_shared(graph: Any) -> bool:
    return BLOB in graph.__dict__


def graph_blob(graph: Any) -> bytes:
    """The bytes ``graph`` pickles as: its state without caches (names
    starting with ``_``), buffers without their owner."""
    blob = graph.__dict__.get(BLOB)
    if blob is not None and graph.__dict__.get(STAMP) == _stamp(graph):
        return blob
    state = {k: v for k, v in graph.__dict__.items() if not k.startswith("_")}
    try:
        blob = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, AttributeError, TypeError):
        blob = None
    if blob is None or b"__main__" in blob:
        # Closures, lambdas and functions of __main__ (a notebook's, a
        # script's) go by value: the receiving process has no such module.
        import cloudpickle

        blob = cloudpickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    return blob


def load_graph(blob: bytes) -> Any:
    """The graph described by ``blob``: the instance loaded from the same
    bytes before if its kernels' functions are current, else a new one."""
    global _loaded_bytes
    with _lock:
        graph = _loaded.get(blob)
        if graph is not None and _current(graph):
            _loaded.move_to_end(blob)
            return graph
    graph = _new_graph(pickle.loads(blob))
    graph.__dict__[BLOB] = blob
    graph.__dict__[STAMP] = _stamp(graph)
    graph.__dict__[BY_NAME] = _by_name(graph)
    with _lock:
        old = _loaded.pop(blob, None)
        if old is not None:
            _loaded_bytes -= len(blob)
        _loaded[blob] = graph
        _loaded_bytes += len(blob)
        while len(_loaded) > MAX_SHARED or (_loaded_bytes > MAX_SHARED_BYTES
                                            and len(_loaded) > 1):
            key, _ = _loaded.popitem(last=False)
            _loaded_bytes -= len(key)
    return graph


def _by_name(graph: Any) -> tuple:
    """The array kernels whose function this process imported by name."""
    out = []
    for launch in graph.launches:
        fn = getattr(launch.kernel, "fn", None)
        mod, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
        if fn is not None and mod and qual and _lookup(mod, qual) is fn:
            out.append((fn, mod, qual))
    return tuple(out)


def _lookup(mod: str, qual: str) -> Any:
    obj: Any = sys.modules.get(mod)
    for part in qual.split("."):
        obj = getattr(obj, part, None)
    return obj


def _current(graph: Any) -> bool:
    """Whether the functions ``graph`` holds are still the ones their modules
    export (not after a reload) and it was not changed."""
    if graph.__dict__.get(STAMP) != _stamp(graph):
        return False
    return all(_lookup(mod, qual) is fn for fn, mod, qual in graph.__dict__.get(BY_NAME, ()))


def _new_graph(state: dict[str, Any], cls: Any = None) -> Any:
    if cls is None:
        from .graph import KernelGraph

        cls = KernelGraph
    graph = cls.__new__(cls)
    graph.__dict__.update(state)
    for buf in graph.buffers.values():
        object.__setattr__(buf, "owner", graph)
    return graph


def copy_graph(graph: Any) -> Any:
    """An independent, unshared copy (``copy.copy`` and ``copy.deepcopy``)."""
    return _new_graph(pickle.loads(graph_blob(graph)), type(graph))
