"""Jacobi iteration for A x = b, as one graph repeated with `n_iter`.

The step kernel is CUDA C (compiled with NVRTC on a GPU worker) with a NumPy
implementation of the same argument order for the CPU backend.  Each
iteration computes x from x0, then copies x back into x0; `x0` is an input
that the graph updates in place, so it works on a private device copy and
the caller's array is left alone.
"""

from __future__ import annotations

import numpy as np

from ..graph import In, Kernel, KernelGraph, Out

JACOBI_SOURCE = r"""
extern "C" __global__
void jacobi_step(const float* A, const float* b, const float* x0, float* x, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float* row = A + (size_t)i * n;
    float sigma = 0.0f;
    for (int j = 0; j < n; ++j) {
        if (j != i) sigma += row[j] * x0[j];
    }
    x[i] = (b[i] - sigma) / row[i];
}
"""


def jacobi_step_cpu(xp, A, b, x0, x, n):
    d = xp.diagonal(A)
    x[...] = (b - (A @ x0 - d * x0)) / d


jacobi_step = Kernel.cuda(JACOBI_SOURCE, "jacobi_step", cpu=jacobi_step_cpu)
copy = Kernel.library("copy")

BLOCK = 128


def jacobi_graph(n: int, iterations: int) -> KernelGraph:
    g = KernelGraph(f"jacobi-{n}", n_iter=iterations)
    A = g.const("A", (n, n), np.float32)
    b = g.input("b", (n,), np.float32)
    x0 = g.input("x0", (n,), np.float32)
    x = g.output("x", (n,), np.float32)
    grid = (n + BLOCK - 1) // BLOCK
    g.launch(jacobi_step, [In(A), In(b), In(x0), Out(x), np.int32(n)], grid=grid, block=BLOCK)
    g.launch(copy, [In(x), Out(x0)])
    return g


def problem(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A strictly diagonally dominant system, so Jacobi converges."""
    rng = np.random.default_rng(seed)
    A = rng.uniform(-1, 1, (n, n)).astype(np.float32)
    A += np.diag(np.abs(A).sum(axis=1) + 1).astype(np.float32)
    b = rng.uniform(-1, 1, n).astype(np.float32)
    return A, b


def reference(A: np.ndarray, b: np.ndarray, x0: np.ndarray, iterations: int) -> np.ndarray:
    x = x0.copy()
    for _ in range(iterations):
        xn = np.empty_like(x)
        jacobi_step_cpu(np, A, b, x, xn, np.int32(len(b)))
        x = xn
    return x
