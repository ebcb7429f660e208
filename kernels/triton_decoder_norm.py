"""Decoder-norm constraint in Triton: the parallel-gradient projection and the row renormalization.

For each row i of W_dec [d_sae, d] and of its gradient G [d_sae, d]:

    remove_parallel_grad_:  G_i <- G_i - (<G_i, W_i> / ||W_i||^2) W_i    (a zero row W_i leaves G_i)
    normalize_rows_:        W_i <- W_i / max(||W_i||, eps)

Both are row-wise and in place, so under FSDP2 (W_dec sharded on latents) each rank runs them on
its local shard with no communication. One program per BLOCK_M rows; two passes over d (reduce,
then update; the second pass mostly hits L2: a 64-row block of d=7168 fp32 is 1.8 MiB).
Dtypes: any float dtype in storage; the dot products, norms and updates run in fp32 and the result
is rounded once to the storage dtype. Reference: remove_parallel_grad_ref, normalize_rows_ref.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .triton_common import check_float, launch

BLOCK_M = 4  # rows per program: 4 x 512 fp32 tiles keep 16 values per thread at 4 warps
BLOCK_D = 512
EPS = 1e-12  # normalize_rows_ref's default: a zero row stays zero
TINY = 1.1754943508222875e-38  # float32 tiny, as remove_parallel_grad_ref clamps ||W_i||^2


@triton.jit
def _remove_parallel_grad_kernel(
    w_ptr,  # [d_sae, d]
    g_ptr,  # [d_sae, d], updated in place
    stride_w_m,
    stride_g_m,
    m,
    d,
    TINY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < m
    dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_m[:, None] & (offs_d < d)[None, :]
        w = tl.load(w_ptr + offs_m[:, None] * stride_w_m + offs_d[None, :], mask=mask, other=0.0)
        g = tl.load(g_ptr + offs_m[:, None] * stride_g_m + offs_d[None, :], mask=mask, other=0.0)
        w, g = w.to(tl.float32), g.to(tl.float32)
        dot += tl.sum(w * g, axis=1)
        sq += tl.sum(w * w, axis=1)
    coef = tl.where(sq > 0.0, dot / tl.maximum(sq, TINY), 0.0)  # [BLOCK_M]
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_m[:, None] & (offs_d < d)[None, :]
        w = tl.load(w_ptr + offs_m[:, None] * stride_w_m + offs_d[None, :], mask=mask, other=0.0)
        w = w.to(tl.float32)
        g_ptrs = g_ptr + offs_m[:, None] * stride_g_m + offs_d[None, :]
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(g_ptrs, (g - coef[:, None] * w).to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _normalize_rows_kernel(
    w_ptr,  # [d_sae, d], updated in place
    stride_w_m,
    m,
    d,
    EPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < m
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_m[:, None] & (offs_d < d)[None, :]
        w = tl.load(w_ptr + offs_m[:, None] * stride_w_m + offs_d[None, :], mask=mask, other=0.0)
        w = w.to(tl.float32)
        sq += tl.sum(w * w, axis=1)
    scale = 1.0 / tl.maximum(tl.sqrt(sq), EPS)  # [BLOCK_M]
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_m[:, None] & (offs_d < d)[None, :]
        w_ptrs = w_ptr + offs_m[:, None] * stride_w_m + offs_d[None, :]
        w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(w_ptrs, (w * scale[:, None]).to(w_ptr.dtype.element_ty), mask=mask)


def _check_2d(name: str, t: Tensor) -> None:
    if t.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D [d_sae, d] tensor; got shape {tuple(t.shape)}")
    check_float(name, t, tuple(t.shape))


def remove_parallel_grad_(W: Tensor, G: Tensor) -> Tensor:
    """In place on G [d_sae, d]: remove from each row its component along the matching row of W."""
    _check_2d("W", W)
    _check_2d("G", G)
    if W.shape != G.shape or W.device != G.device:
        raise ValueError(f"W {tuple(W.shape)} on {W.device} and G {tuple(G.shape)} on {G.device} must match")
    m, d = W.shape
    launch(_remove_parallel_grad_kernel, (triton.cdiv(m, BLOCK_M),), W.device,
           W, G, W.stride(0), G.stride(0), m, d, TINY=TINY, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=4)
    return G


def normalize_rows_(W: Tensor) -> Tensor:
    """In place on W [d_sae, d]: every row to unit L2 norm (a zero row stays zero)."""
    _check_2d("W", W)
    m, d = W.shape
    launch(_normalize_rows_kernel, (triton.cdiv(m, BLOCK_M),), W.device,
           W, W.stride(0), m, d, EPS=EPS, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=4)
    return W
