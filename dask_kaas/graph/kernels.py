"""Kernels: the code a launch runs, in one of three forms.

A kernel is data, not a loaded module: it says *what* to run (CUDA source,
a PTX/cubin image, a named built-in, or an array function) and each worker's
kernel cache turns it into something callable for its backend, once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import KernelDefinitionError
from .functions import function_ref, read_function
from .library import BUILTINS
from .names import name_problem

if TYPE_CHECKING:
    from .reader import Where


def _encodable(*texts: object) -> bool:
    try:
        for t in texts:
            if isinstance(t, str):
                t.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Kernel:
    """The code of a launch.  Build one with the ``Kernel.*`` constructors."""

    ARRAY = "array"
    CUDA = "cuda"
    CUDA_FILE = "cuda_file"
    LIBRARY = "library"

    #: What a kernel is (compared, pickled); ``_key`` is derived from them.
    FIELDS = ("kind", "name", "fn", "source", "image", "image_format",
              "options", "cpu", "name_expressions")
    __slots__ = FIELDS + ("_key",)

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
        self._key: tuple[Any, ...] | None = None

    # -- constructors -------------------------------------------------
    @classmethod
    def array(cls, fn: Callable[..., Any], name: str | None = None) -> Kernel:
        """``fn(xp, *args)`` written against the NumPy/CuPy API; buffer
        arguments arrive as arrays (outputs are written in place), literals as
        NumPy scalars."""
        if not callable(fn):
            raise KernelDefinitionError(f"Kernel.array needs a callable, got {fn!r}")
        name = name or getattr(fn, "__name__", None) or "array_kernel"
        problem = name_problem(name)
        if problem:
            raise KernelDefinitionError(f"a kernel name {problem}")
        return cls(cls.ARRAY, name, fn=fn)

    @classmethod
    def cuda(cls, source: str, name: str, cpu: Callable[..., Any] | None = None,
             options: Sequence[str] = (), name_expressions: Sequence[str] = ()) -> Kernel:
        """CUDA C source compiled with NVRTC on the worker.  ``name`` is the
        ``extern "C"`` function (or a template instantiation listed in
        ``name_expressions``); ``cpu`` is an array function with the same
        argument order used by the CPU backend."""
        problem = name_problem(name)
        if problem:
            raise KernelDefinitionError(f"Kernel.cuda needs the function name: it {problem}")
        if not isinstance(source, str) or not source.strip():
            raise KernelDefinitionError("Kernel.cuda needs non-empty CUDA source", kernel=name)
        if cpu is not None and not callable(cpu):
            raise KernelDefinitionError(f"cpu= must be callable, got {cpu!r}", kernel=name)
        if isinstance(options, str) or not isinstance(options, (list, tuple)) or any(
                not isinstance(o, str) for o in options):
            raise KernelDefinitionError("NVRTC options must be a list of strings",
                                        kernel=name)
        if isinstance(name_expressions, str) or not isinstance(name_expressions, (list, tuple)) \
                or any(not isinstance(e, str) for e in name_expressions):
            raise KernelDefinitionError("name_expressions must be a list of strings",
                                        kernel=name)
        if not _encodable(source, *options, *name_expressions):
            raise KernelDefinitionError("CUDA source and options must be valid Unicode (a lone "
                                        "surrogate cannot be compiled or written)", kernel=name)
        # No #include, no file options: refused here already, so a client or
        # the gateway hears it at once (workers check again before compiling).
        from ..device.cuda_source import check_source

        check_source(source, options, name)
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
        The source (or image) itself is part of the key, not a digest of it:
        Python hashes a string once per object and a hit compares it with
        one memcmp, where a SHA-256 cost 1.3 us for 137 bytes and 20 us for
        32 KiB on every launch.  The key is computed once per kernel object
        (a kernel is not changed after it is made).
        """
        key = self._key
        if key is None:
            if self.kind == self.ARRAY:
                key = (self.kind, self.name, self.fn)
            elif self.kind == self.LIBRARY:
                key = (self.kind, self.name)
            else:
                blob = self.source if self.source is not None else (self.image or b"")
                key = (self.kind, self.name, blob, self.image_format, self.options,
                       self.name_expressions, self.cpu)
            self._key = key
        return key

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
    def from_dict(cls, d: Any, at: Where | None = None) -> Kernel:
        """Read a kernel's dict form strictly (exact fields and types) and
        build it through the public constructors, so it is checked as one
        built in Python."""
        import base64
        import binascii

        from . import reader

        at = at or reader.Where()
        kinds = (cls.ARRAY, cls.CUDA, cls.CUDA_FILE, cls.LIBRARY)
        kind = reader.one_of(reader.record(d, at, ("kind",), ("name", "fn", "source", "options",
                             "name_expressions", "format", "image", "cpu"))["kind"],
                             at.at("kind"), kinds)
        fields = {cls.ARRAY: (("name", "fn"), ()),
                  cls.CUDA: (("name", "source"), ("options", "name_expressions", "cpu")),
                  cls.CUDA_FILE: (("name", "format", "image"), ("cpu",)),
                  cls.LIBRARY: (("name",), ())}[kind]
        d = reader.record(d, at, ("kind",) + fields[0], fields[1])
        name = reader.name(d["name"], at.at("name"))
        cpu = None
        if d.get("cpu") is not None:
            cpu = read_function(d["cpu"], at.at("cpu"))
        if kind == cls.ARRAY:
            return cls.array(read_function(d["fn"], at.at("fn")), name)
        if kind == cls.CUDA:
            return cls.cuda(reader.string(d["source"], at.at("source"), nonempty=True), name,
                            cpu=cpu, options=reader.strings(d.get("options", []),
                                                            at.at("options")),
                            name_expressions=reader.strings(d.get("name_expressions", []),
                                                            at.at("name_expressions")))
        if kind == cls.CUDA_FILE:
            fmt = reader.one_of(d["format"], at.at("format"), ("ptx", "cubin"))
            try:
                image = base64.b64decode(reader.string(d["image"], at.at("image")),
                                         validate=True)
            except (binascii.Error, ValueError) as e:
                raise at.at("image").fail(f"is not base64: {e}") from None
            if not image:
                raise at.at("image").fail("a CUDA image cannot be empty")
            return cls(cls.CUDA_FILE, name, image=image, image_format=fmt, cpu=cpu)
        if name not in BUILTINS:
            raise at.at("name").fail(f"unknown library kernel; known: "
                                     f"{', '.join(sorted(BUILTINS))}")
        return cls.library(name)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Kernel):
            return NotImplemented
        return all(getattr(self, s) == getattr(other, s) for s in self.FIELDS)

    def __hash__(self) -> int:
        return hash((self.kind, self.name))

    def __repr__(self) -> str:
        return f"Kernel.{self.kind}({self.name!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Never the key: a receiver derives it from what it received.
        return {s: getattr(self, s) for s in self.FIELDS}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._key = None
        for k, v in state.items():
            if k in self.FIELDS:
                setattr(self, k, v)
