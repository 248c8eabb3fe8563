"""Small kernel graphs shared by the reliability tests."""

from __future__ import annotations

import numpy as np

from dask_kaas import InOut, Kernel, KernelGraph, Out

N = 32


def scale_graph(name: str = "scale", n_iter: int = 1, const: bool = True) -> KernelGraph:
    """y = 2 x + w with w a const (or an input: no scattered data to lose
    when a worker restarts)."""
    g = KernelGraph(name, n_iter=n_iter)
    x = g.input("x", (N,), np.float32)
    w = g.const("w", (N,), np.float32) if const else g.input("w", (N,), np.float32)
    t = g.temp("t", (N,), np.float32)
    y = g.output("y", (N,), np.float32)
    g.launch(Kernel.library("copy"), [x, Out(t)])
    g.launch(Kernel.library("axpy"), [np.float32(1), x, InOut(t)])
    g.launch(Kernel.library("add"), [t, w, Out(y)])
    return g


def array_graph(name: str, fn, n: int = N) -> KernelGraph:
    """y = fn(x, w): one array kernel over an input x and a const w."""
    g = KernelGraph(name)
    x = g.input("x", (n,), np.float32)
    w = g.const("w", (n,), np.float32)
    y = g.output("y", (n,), np.float32)
    g.launch(Kernel.array(fn), [x, w, Out(y)])
    return g


def unary_graph(name: str, fn, n: int = N) -> KernelGraph:
    """y = fn(x): one array kernel over one input."""
    g = KernelGraph(name)
    x = g.input("x", (n,), np.float32)
    y = g.output("y", (n,), np.float32)
    g.launch(Kernel.array(fn), [x, Out(y)])
    return g
