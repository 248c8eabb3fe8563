"""KernelGraph: buffers plus an ordered list of launches, as plain data."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .buffers import Buffer, BufferKind, normalize_dtype, normalize_shape
from .errors import (
    BufferRoleError,
    DuplicateBufferError,
    GraphError,
    KernelDefinitionError,
    LaunchConfigError,
    LiteralTypeError,
    UnknownBufferError,
)
from .kernels import Kernel
from .launch import (
    IN,
    INOUT,
    MAX_BLOCK,
    MAX_GRID,
    MAX_SHARED_MEM,
    OUT,
    ArgRef,
    Launch,
    normalize_dims,
)
from .library import BUILTINS, LibraryArgError
from .names import name_problem
from .shared import copy_graph, is_shared, reduce_graph


class KernelGraph:
    """A request's GPU work, described as data.

    Buffers are declared with :meth:`input`, :meth:`const`, :meth:`temp` and
    :meth:`output`; :meth:`launch` appends kernel calls in program order.  The
    whole list of launches is repeated ``n_iter`` times (iterative solvers).
    Mistakes that can be seen locally are raised at the line that makes them;
    whole-graph and input checks run in :meth:`validate`, which
    ``submit_kernel_graph`` calls before anything reaches the cluster.
    """

    def __init__(self, name: str, n_iter: int = 1) -> None:
        problem = name_problem(name)
        if problem:
            raise GraphError(f"a graph name {problem}")
        if isinstance(n_iter, bool) or not isinstance(n_iter, (int, np.integer)) or n_iter < 1:
            raise GraphError(f"n_iter must be a positive int, got {n_iter!r}", graph=name)
        self.name = name
        self.n_iter = int(n_iter)
        self.buffers: dict[str, Buffer] = {}
        self.launches: list[Launch] = []

    # -- buffers -------------------------------------------------------
    def _add_buffer(self, name: str, shape: Any, dtype: Any, kind: BufferKind) -> Buffer:
        problem = name_problem(name)
        if problem:
            raise GraphError(f"a buffer name {problem}", graph=self.name)
        if name in self.buffers:
            raise DuplicateBufferError(
                f"a {self.buffers[name].kind.value} buffer of this name already exists",
                graph=self.name, buffer=name)
        try:
            buf = Buffer(name, normalize_shape(shape), normalize_dtype(dtype), kind, owner=self)
        except (TypeError, ValueError) as e:
            raise GraphError(str(e), graph=self.name, buffer=name) from None
        self._check_writable()
        self.buffers[name] = buf
        return buf

    def input(self, name: str, shape: Any, dtype: Any) -> Buffer:
        """A per-request input: its value is given at submission."""
        return self._add_buffer(name, shape, dtype, BufferKind.INPUT)

    def const(self, name: str, shape: Any, dtype: Any) -> Buffer:
        """An input promised never to change, cacheable on a device across
        requests (model weights)."""
        return self._add_buffer(name, shape, dtype, BufferKind.CONST)

    def temp(self, name: str, shape: Any, dtype: Any) -> Buffer:
        """Scratch space that lives only while the graph runs."""
        return self._add_buffer(name, shape, dtype, BufferKind.TEMP)

    def output(self, name: str, shape: Any, dtype: Any) -> Buffer:
        """A result returned to the caller (or kept on the device)."""
        return self._add_buffer(name, shape, dtype, BufferKind.OUTPUT)

    # -- launches ------------------------------------------------------
    def launch(self, kernel: Kernel, args: Sequence[Any], grid: Any = None,
               block: Any = None, shared_mem: int = 0) -> Launch:
        """Append a call of ``kernel``.

        ``args`` are in the kernel's argument order: buffers wrapped in
        ``In``/``Out``/``InOut`` (a bare buffer means ``In``) and literals as
        NumPy scalars (``np.float32(0.5)``), whose dtype is the C type the
        kernel receives.
        """
        index = len(self.launches)
        kname = getattr(kernel, "name", None)

        def fail(cls: type[GraphError], msg: str, buffer: str | None = None) -> GraphError:
            return cls(msg, graph=self.name, launch=index, kernel=kname, buffer=buffer)

        if not isinstance(kernel, Kernel):
            raise fail(KernelDefinitionError,
                       f"launch needs a Kernel (Kernel.array/cuda/cuda_file/library), "
                       f"got {type(kernel).__name__}")
        if isinstance(args, (str, bytes)) or not isinstance(args, Iterable):
            raise fail(GraphError, f"args must be a sequence, got {type(args).__name__}")
        parsed: list[Any] = []
        for pos, arg in enumerate(args):
            if isinstance(arg, Buffer):
                arg = ArgRef(arg, IN)
            if isinstance(arg, ArgRef):
                self._check_owned(arg.buffer, fail)
                parsed.append(arg)
            elif isinstance(arg, np.generic) and np.dtype(arg.dtype).kind in "biufc":
                parsed.append(arg)
            else:
                hint = ""
                if isinstance(arg, bool):
                    hint = " (use np.bool_(...))"
                elif isinstance(arg, int):
                    hint = " (use e.g. np.int32(...) or np.int64(...))"
                elif isinstance(arg, float):
                    hint = " (use e.g. np.float32(...) or np.float64(...))"
                raise fail(LiteralTypeError,
                           f"argument {pos} is a {type(arg).__name__}: literals must be "
                           f"NumPy scalars with an explicit dtype, since the kernel's C "
                           f"type would otherwise be a guess{hint}")
        self._check_roles(parsed, fail)
        if kernel.kind == Kernel.LIBRARY:
            self._check_library_args(kernel, parsed, fail)

        try:
            g = normalize_dims(grid, "grid", MAX_GRID) if grid is not None else None
            b = normalize_dims(block, "block", MAX_BLOCK) if block is not None else None
        except ValueError as e:
            raise fail(LaunchConfigError, str(e)) from None
        if kernel.is_cuda and (g is None or b is None):
            raise fail(LaunchConfigError, "a CUDA kernel launch needs both grid and block")
        if (isinstance(shared_mem, bool) or not isinstance(shared_mem, (int, np.integer))
                or not 0 <= shared_mem <= MAX_SHARED_MEM):
            raise fail(LaunchConfigError,
                       f"shared_mem must be an int in 0..{MAX_SHARED_MEM}, got {shared_mem!r}")
        launch = Launch(kernel, tuple(parsed), g, b, int(shared_mem))
        self._check_writable()
        self.launches.append(launch)
        return launch

    def _check_owned(self, buf: Buffer, fail: Any) -> None:
        if buf.owner is not self or self.buffers.get(buf.name) is not buf:
            owner = getattr(buf.owner, "name", None)
            where = f" (it belongs to graph {owner!r})" if owner and buf.owner is not self else ""
            raise fail(UnknownBufferError, f"buffer is not part of this graph{where}",
                       buf.name)

    @staticmethod
    def _check_roles(args: list[Any], fail: Any) -> None:
        seen: dict[str, ArgRef] = {}
        for a in args:
            if not isinstance(a, ArgRef):
                continue
            buf = a.buffer
            if a.writes and buf.kind == BufferKind.CONST:
                raise fail(BufferRoleError,
                           "a const buffer is promised never to change and cannot be written "
                           "(declare it as an input to update a private copy)", buf.name)
            prev = seen.get(buf.name)
            if prev is not None and (prev.writes or a.writes):
                raise fail(BufferRoleError,
                           "the same buffer is passed twice and written through one of them "
                           "(aliasing); use one InOut argument", buf.name)
            seen[buf.name] = a

    @staticmethod
    def _check_library_args(kernel: Kernel, args: list[Any], fail: Any) -> None:
        spec = BUILTINS[kernel.name]
        required = sum(1 for s in spec.args if not s.optional)
        if not required <= len(args) <= len(spec.args):
            sig = ", ".join(s.name + ("?" if s.optional else "") for s in spec.args)
            raise fail(GraphError, f"{kernel.name}({sig}) takes {required} to "
                                   f"{len(spec.args)} arguments, got {len(args)}")
        for s, a in zip(spec.args, args):
            if s.role == "literal":
                if isinstance(a, ArgRef):
                    raise fail(LiteralTypeError, f"argument {s.name!r} must be a literal",
                               a.buffer.name)
                continue
            if not isinstance(a, ArgRef):
                raise fail(GraphError, f"argument {s.name!r} must be a buffer")
            if s.role == "in" and a.mode != IN:
                raise fail(BufferRoleError, f"argument {s.name!r} is only read: pass In()",
                           a.buffer.name)
            if s.role == "out" and a.mode == IN:
                raise fail(BufferRoleError,
                           f"argument {s.name!r} is written: pass Out() or InOut()",
                           a.buffer.name)
            if s.role == "inout" and a.mode != INOUT:
                raise fail(BufferRoleError,
                           f"argument {s.name!r} is read and written: pass InOut()",
                           a.buffer.name)
        try:
            spec.check(args)
        except LibraryArgError as e:
            raise fail(GraphError, str(e)) from None

    # -- derived views -------------------------------------------------
    def buffers_of(self, *kinds: BufferKind) -> list[Buffer]:
        return [b for b in self.buffers.values() if b.kind in kinds]

    @property
    def inputs(self) -> list[Buffer]:
        """Buffers whose values the caller gives (``input`` and ``const``)."""
        return self.buffers_of(BufferKind.INPUT, BufferKind.CONST)

    @property
    def outputs(self) -> list[Buffer]:
        return self.buffers_of(BufferKind.OUTPUT)

    @property
    def nbytes(self) -> int:
        """Device bytes the graph needs at once: every input, const and
        output buffer, plus the peak of its temps (temps that are never
        live together share memory: :mod:`.memplan`)."""
        from .memplan import plan_temps

        return sum(b.nbytes for b in self.buffers.values()
                   if b.kind != BufferKind.TEMP) + plan_temps(self).arena_bytes

    def describe(self) -> dict[str, Any]:
        """A summary for people and logs: launches per kernel, bytes per
        buffer kind, and the temp memory plan (peak against sum)."""
        from .memplan import plan_temps

        plan = plan_temps(self)
        kernels: dict[str, int] = {}
        for launch in self.launches:
            kernels[launch.kernel.name] = kernels.get(launch.kernel.name, 0) + 1
        kinds = {k.value: {"count": 0, "bytes": 0} for k in BufferKind}
        for b in self.buffers.values():
            kinds[b.kind.value]["count"] += 1
            kinds[b.kind.value]["bytes"] += b.nbytes
        return {"name": self.name, "launches": len(self.launches), "n_iter": self.n_iter,
                "kernels": kernels, "buffers": kinds,
                "temp_sum_bytes": plan.sum_bytes, "temp_peak_bytes": plan.arena_bytes,
                "temp_ratio": round(plan.ratio, 4), "nbytes": self.nbytes}

    def written_buffers(self) -> set[str]:
        return {a.buffer.name for launch in self.launches for a in launch.buffer_args()
                if a.writes}

    # -- validation ----------------------------------------------------
    def validate(self, inputs: Mapping[str, Any] | None = None,
                 device_capacity: int | None = None) -> KernelGraph:
        """Check the whole graph (and, if given, the inputs and the largest
        worker's device capacity); raise the specific KaasError, else return
        the graph."""
        from .validate import validate_graph

        validate_graph(self, inputs, device_capacity)
        return self

    # -- dict / JSON form ----------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        from .serialize import graph_to_dict

        return graph_to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> KernelGraph:
        """Read a graph from its dict form, as strictly as :meth:`from_json`."""
        from .serialize import graph_from_dict

        return graph_from_dict(d)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str | bytes) -> KernelGraph:
        """Read a graph from JSON text or UTF-8 bytes.  Anything else, or any
        malformed or hostile document, is a SerializationError naming the
        field; see :mod:`dask_kaas.graph.reader` for the rules."""
        from .serialize import graph_from_json

        return graph_from_json(text)

    # -- ONNX ------------------------------------------------------------
    @classmethod
    def from_onnx(cls, model: Any, *, batch: Any = None, name: str | None = None
                  ) -> tuple[KernelGraph, dict[str, np.ndarray]]:
        """An ONNX model (ModelProto, path or bytes) as ``(graph, consts)``;
        see :func:`dask_kaas.onnx.from_onnx`.  ``onnx`` is imported only here."""
        from ..onnx import from_onnx

        return from_onnx(model, batch=batch, name=name)

    # -- pickling ------------------------------------------------------
    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # As the bytes of its description: a receiving process keeps one
        # instance per distinct graph (see graph/shared.py).
        return reduce_graph(self)

    def __copy__(self) -> KernelGraph:
        return copy_graph(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> KernelGraph:
        return copy_graph(self)

    def __setattr__(self, name: str, value: Any) -> None:
        if not name.startswith("_") and is_shared(self):
            self._check_writable()
        object.__setattr__(self, name, value)

    def _check_writable(self) -> None:
        if is_shared(self):
            raise GraphError("this graph was received from another process and is shared "
                             "by every request that carries it; build on copy.deepcopy(graph)",
                             graph=self.name)

    # -- comparison ----------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KernelGraph):
            return NotImplemented
        if (self.name, self.n_iter) != (other.name, other.n_iter):
            return False
        if list(self.buffers) != list(other.buffers) or not all(
                self.buffers[k].same_as(other.buffers[k]) for k in self.buffers):
            return False
        if len(self.launches) != len(other.launches):
            return False
        for a, b in zip(self.launches, other.launches):
            if (a.kernel != b.kernel or a.grid != b.grid or a.block != b.block
                    or a.shared_mem != b.shared_mem or len(a.args) != len(b.args)):
                return False
            for x, y in zip(a.args, b.args):
                if isinstance(x, ArgRef) != isinstance(y, ArgRef):
                    return False
                if isinstance(x, ArgRef):
                    if (x.buffer.name, x.mode) != (y.buffer.name, y.mode):
                        return False
                elif x.dtype != y.dtype or not _same_scalar(x, y):
                    return False
        return True

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"KernelGraph({self.name!r}, buffers={len(self.buffers)}, "
                f"launches={len(self.launches)}, n_iter={self.n_iter})")


def _same_scalar(x: np.generic, y: np.generic) -> bool:
    return bool(x == y) or (bool(np.isnan(x)) and bool(np.isnan(y))) if x.dtype.kind in "fc" \
        else bool(x == y)


__all__ = ["KernelGraph", "OUT", "INOUT", "IN"]
