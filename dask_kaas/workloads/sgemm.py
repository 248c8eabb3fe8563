"""A chain of matrix products whose intermediates never leave the device.

Each link is its own graph: C_k = relu(C_{k-1} @ B_k), computed by a CUDA
sgemm kernel (NumPy implementation on the CPU backend).  Every intermediate
is kept on the device (`keep_on_device`) and handed to the next graph by
reference, which places that graph on the worker that holds it.
"""

from __future__ import annotations

import numpy as np

from ..graph import In, InOut, Kernel, KernelGraph, Out

TILE = 16

SGEMM_SOURCE = r"""
#define TILE 16
extern "C" __global__
void sgemm(const float* A, const float* B, float* C, int M, int N, int K)
{
    __shared__ float As[TILE][TILE];
    __shared__ float Bs[TILE][TILE];
    int row = blockIdx.y * TILE + threadIdx.y;
    int col = blockIdx.x * TILE + threadIdx.x;
    float acc = 0.0f;
    for (int t = 0; t < (K + TILE - 1) / TILE; ++t) {
        int ka = t * TILE + threadIdx.x;
        int kb = t * TILE + threadIdx.y;
        As[threadIdx.y][threadIdx.x] = (row < M && ka < K) ? A[(size_t)row * K + ka] : 0.0f;
        Bs[threadIdx.y][threadIdx.x] = (kb < K && col < N) ? B[(size_t)kb * N + col] : 0.0f;
        __syncthreads();
        for (int k = 0; k < TILE; ++k) acc += As[threadIdx.y][k] * Bs[k][threadIdx.x];
        __syncthreads();
    }
    if (row < M && col < N) C[(size_t)row * N + col] = acc;
}
"""


def sgemm_cpu(xp, A, B, C, M, N, K):
    xp.matmul(A, B, out=C)


def relu_inplace_fn(xp, c):
    xp.maximum(c, 0, out=c)


sgemm = Kernel.cuda(SGEMM_SOURCE, "sgemm", cpu=sgemm_cpu)
relu_inplace = Kernel.array(relu_inplace_fn, name="relu_inplace")


def link_graph(n: int) -> KernelGraph:
    """One link of the chain: c = relu(a @ b), all n x n."""
    return link_graph_rect(n, n)


def link_graph_rect(m: int, n: int) -> KernelGraph:
    """c = relu(a @ b) with a of m x n rows and a square n x n const b."""
    g = KernelGraph(f"sgemm-{m}x{n}")
    a = g.input("a", (m, n), np.float32)
    b = g.const("b", (n, n), np.float32)
    c = g.output("c", (m, n), np.float32)
    grid = ((n + TILE - 1) // TILE, (m + TILE - 1) // TILE)
    g.launch(sgemm, [In(a), In(b), Out(c), np.int32(m), np.int32(n), np.int32(n)],
             grid=grid, block=(TILE, TILE))
    g.launch(relu_inplace, [InOut(c)])
    return g
