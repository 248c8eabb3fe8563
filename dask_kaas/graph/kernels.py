"""Kernels: the code a launch runs, in one of three forms.

A kernel is data, not a loaded module: it says *what* to run (CUDA source,
a PTX/cubin image, a named built-in, or an array function) and each worker's
kernel cache turns it into something callable for its backend, once.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Callable, Sequence
from typing import Any

from .errors import KernelDefinitionError, SerializationError
from .library import BUILTINS


def function_ref(fn: Callable[..., Any]) -> str:
    """``module:qualname`` of an importable function, for the JSON form."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not module or not qualname or "<" in qualname or module == "__main__":
        raise SerializationError(
            f"function {qualname or fn!r} cannot be named in JSON: only functions "
            "importable as 'module:function' can (not lambdas, nested functions or "
            "functions defined in __main__); submitting the graph from Python "
            "still works")
    try:
        resolved = resolve_function(f"{module}:{qualname}")
    except SerializationError:
        resolved = None
    if resolved is not fn:
        raise SerializationError(
            f"function {module}:{qualname} does not resolve back to itself on import")
    return f"{module}:{qualname}"


def resolve_function(ref: str) -> Callable[..., Any]:
    module_name, _, qualname = ref.partition(":")
    if not module_name or not qualname:
        raise SerializationError(f"function reference {ref!r} is not 'module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise SerializationError(f"cannot import function {ref!r}: {e}") from None
    if not callable(obj):
        raise SerializationError(f"{ref!r} is not callable")
    return obj


class Kernel:
    """The code of a launch.  Build one with the ``Kernel.*`` constructors."""

    ARRAY = "array"
    CUDA = "cuda"
    CUDA_FILE = "cuda_file"
    LIBRARY = "library"

    __slots__ = ("kind", "name", "fn", "source", "image", "image_format",
                 "options", "cpu", "name_expressions")

    def __init__(self, kind: str, name: str, *, fn: Callable[..., Any] | None = None,
                 source: str | None = None, image: bytes | None = None,
                 image_format: str | None = None, options: Sequence[str] = (),
                 cpu: Callable[..., Any] | None = None,
                 name_expressions: Sequence[str] = ()) -> None:
        self.kind = kind
        self.name = name
        self.fn = fn
        self.source = source
        self.image = image
        self.image_format = image_format
        self.options = tuple(options)
        self.cpu = cpu
        self.name_expressions = tuple(name_expressions)

    # -- constructors -------------------------------------------------
    @classmethod
    def array(cls, fn: Callable[..., Any], name: str | None = None) -> Kernel:
        """``fn(xp, *args)`` written against the NumPy/CuPy API; buffer
        arguments arrive as arrays (outputs are written in place), literals as
        NumPy scalars."""
        if not callable(fn):
            raise KernelDefinitionError(f"Kernel.array needs a callable, got {fn!r}")
        return cls(cls.ARRAY, name or getattr(fn, "__name__", "array_kernel"), fn=fn)

    @classmethod
    def cuda(cls, source: str, name: str, cpu: Callable[..., Any] | None = None,
             options: Sequence[str] = (), name_expressions: Sequence[str] = ()) -> Kernel:
        """CUDA C source compiled with NVRTC on the worker.  ``name`` is the
        ``extern "C"`` function (or a template instantiation listed in
        ``name_expressions``); ``cpu`` is an array function with the same
        argument order used by the CPU backend."""
        if not isinstance(source, str) or not source.strip():
            raise KernelDefinitionError("Kernel.cuda needs non-empty CUDA source", kernel=name)
        if not isinstance(name, str) or not name:
            raise KernelDefinitionError("Kernel.cuda needs the function name")
        if cpu is not None and not callable(cpu):
            raise KernelDefinitionError(f"cpu= must be callable, got {cpu!r}", kernel=name)
        if any(not isinstance(o, str) for o in options):
            raise KernelDefinitionError("NVRTC options must be strings", kernel=name)
        exprs = tuple(name_expressions)
        if exprs and name not in exprs:
            exprs = exprs + (name,)
        return cls(cls.CUDA, name, source=source, options=options, cpu=cpu,
                   name_expressions=exprs)

    @classmethod
    def cuda_file(cls, path: str | os.PathLike[str], name: str,
                  cpu: Callable[..., Any] | None = None) -> Kernel:
        """A compiled PTX or cubin file.  Its bytes are read now, so the
        graph carries the image to the workers."""
        path = os.fspath(path)
        ext = os.path.splitext(path)[1].lower()
        if ext not in (".ptx", ".cubin"):
            raise KernelDefinitionError(
                f"Kernel.cuda_file takes a .ptx or .cubin file, got {path!r}", kernel=name)
        try:
            with open(path, "rb") as f:
                image = f.read()
        except OSError as e:
            raise KernelDefinitionError(f"cannot read {path!r}: {e}", kernel=name) from None
        if cpu is not None and not callable(cpu):
            raise KernelDefinitionError(f"cpu= must be callable, got {cpu!r}", kernel=name)
        return cls(cls.CUDA_FILE, name, image=image, image_format=ext[1:], cpu=cpu)

    @classmethod
    def library(cls, name: str) -> Kernel:
        """A built-in with an implementation for every backend: one of
        ``gemm``, ``axpy``, ``relu``, ``add``, ``copy``, ``reduce_sum``."""
        if name not in BUILTINS:
            raise KernelDefinitionError(
                f"unknown library kernel {name!r}; known: {', '.join(sorted(BUILTINS))}")
        return cls(cls.LIBRARY, name)

    # -- properties ----------------------------------------------------
    @property
    def is_cuda(self) -> bool:
        return self.kind in (self.CUDA, self.CUDA_FILE)

    def has_cpu_implementation(self) -> bool:
        return not self.is_cuda or self.cpu is not None

    def cache_key(self) -> tuple[Any, ...]:
        """Identity for the per-worker kernel cache: equal kernels compile once.

        Functions are part of the key as objects (not ``id()``), so a key
        keeps its function alive and can never be confused with a later one.
        """
        if self.kind == self.ARRAY:
            return (self.kind, self.name, self.fn)
        if self.kind == self.LIBRARY:
            return (self.kind, self.name)
        blob = self.source.encode() if self.source is not None else (self.image or b"")
        digest = hashlib.sha256(blob).hexdigest()
        return (self.kind, self.name, digest, self.options, self.name_expressions,
                self.cpu)

    # -- dict form -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "name": self.name}
        if self.kind == self.ARRAY:
            d["fn"] = function_ref(self.fn)  # type: ignore[arg-type]
        elif self.kind == self.CUDA:
            d["source"] = self.source
            d["options"] = list(self.options)
            if self.name_expressions:
                d["name_expressions"] = list(self.name_expressions)
        elif self.kind == self.CUDA_FILE:
            import base64

            d["format"] = self.image_format
            d["image"] = base64.b64encode(self.image or b"").decode("ascii")
        if self.is_cuda:
            d["cpu"] = function_ref(self.cpu) if self.cpu is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Kernel:
        try:
            kind = d["kind"]
            name = d["name"]
            cpu = resolve_function(d["cpu"]) if d.get("cpu") else None
            if kind == cls.ARRAY:
                return cls(cls.ARRAY, name, fn=resolve_function(d["fn"]))
            if kind == cls.CUDA:
                return cls(cls.CUDA, name, source=d["source"], options=d.get("options", ()),
                           cpu=cpu, name_expressions=d.get("name_expressions", ()))
            if kind == cls.CUDA_FILE:
                import base64

                return cls(cls.CUDA_FILE, name, image=base64.b64decode(d["image"]),
                           image_format=d["format"], cpu=cpu)
            if kind == cls.LIBRARY:
                return cls.library(name)
        except KeyError as e:
            raise SerializationError(f"kernel description lacks field {e}") from None
        raise SerializationError(f"unknown kernel kind {kind!r}", kernel=name)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Kernel):
            return NotImplemented
        return all(getattr(self, s) == getattr(other, s) for s in self.__slots__)

    def __hash__(self) -> int:
        return hash((self.kind, self.name))

    def __repr__(self) -> str:
        return f"Kernel.{self.kind}({self.name!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {s: getattr(self, s) for s in self.__slots__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)
