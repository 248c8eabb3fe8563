"""Cache identities from what a worker really received.

A request names the identity of each cached input (``InputRef.buffer_id``),
but a client can write anything there, e.g. another tenant's const key, and
so store its own data under that tenant's name.  The worker therefore takes
identities from the running Dask task instead: an input that arrived as a
dependency is identified by that dependency's Dask key (its content is what
Dask says it is); an input sent inline is private to its request.  Kept
outputs are named after the running task's own key.
"""

from __future__ import annotations

from typing import Any

from dask._task_spec import Alias, TaskRef

from ..device.runtime import Identities

#: run_kernel_graph(graph, request, *values): where the values start.
FIRST_VALUE = 2


def dependency_key(arg: Any) -> str | None:
    """The Dask key an argument of a task spec stands for, or None if the
    argument is data embedded in the task itself."""
    if isinstance(arg, TaskRef):
        return str(arg.key)
    if isinstance(arg, Alias):
        return str(arg.target)
    return None


def value_keys(run_spec: Any) -> list[str | None]:
    """The dependency key (or None) of each input value of a graph task."""
    args = getattr(run_spec, "args", None) or ()
    return [dependency_key(a) for a in args[FIRST_VALUE:]]


def kept_id(task_key: Any, output: str) -> str:
    """Buffer id (= Dask key of its select task) of a kept output."""
    return f"{task_key}-out-{output}"


def running_identities(worker: Any, keep: Any, n_values: int) -> Identities:
    """Identities for the graph task running in the calling thread."""
    key = worker.get_current_task()
    ts = worker.state.tasks.get(key)
    inputs = value_keys(ts.run_spec) if ts is not None else []
    inputs = (inputs + [None] * n_values)[:n_values]
    names = keep if isinstance(keep, dict) else {}
    return Identities(inputs, {name: kept_id(key, name) for name in names
                               if isinstance(name, str)})
