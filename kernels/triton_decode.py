"""Sparse decode in Triton: recon = sum of K weighted rows of W_dec + bias, forward and backward.

    forward:   recon[b, :]  = sum_j values[b, j] * W_dec[indices[b, j], :] + bias          # [B, d]
    backward:  dvalues[b, j] = <g[b, :], W_dec[indices[b, j], :]>                          # [B, K]
               dW_dec[i, :]  = sum over slots (b, j) with indices[b, j] = i of values[b, j] * g[b, :]
               dbias         = sum_b g[b, :]                                               # [d]

with g = dL/drecon [B, d]. No dense [B, d_sae] tensor and no B x d_sae x d product: the work is
B*K row gathers of d elements per pass. The forward's program owns a block of tokens and a strip of
columns and accumulates with plain FMAs (no cross-thread reduction). dW_dec has two implementations:
  - "sorted" (default): slots grouped by latent (torch.sort), a block of latents per program, the
    segmented sums on the tensor cores, no atomics, deterministic; see triton_latent_sum.py.
  - "atomic": one program per (token, d block) adding v * g into an fp32 buffer with atomics; no
    sort but nondeterministic summation order, and an fp32 [d_sae, d] buffer plus a cast.
bench/gpu/kernels.py times both (and the forward's launch configs) on a GPU; bench/gpu/NOTES.md has
their byte counts and predicted times.

Shapes: indices [B, K] int64, values [B, K], W_dec [d_sae, d], bias [d]. One float dtype for
values, W_dec and bias (fp32, bf16 or fp16); loads upcast to fp32, fp32 accumulation, outputs in
that dtype. Reference: saetron.kernels.reference.sparse_decode_ref.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import check_float, check_indices, latent_csr, launch
from .triton_latent_sum import latent_row_sum

BLOCK_K = 16  # dvalues, atomic dW: slots per step, a [16, BLOCK_D] gathered tile of W_dec rows
BLOCK_D = 256  # dvalues, atomic dW: columns per step (8 per thread at 4 warps)
# Forward: 32 tokens x 64 columns per program (a [32, 64] fp32 accumulator, 16 values per thread),
# UNROLL=4 slots a step: four [32, 64] gathers (128-byte row pieces, two 16-byte loads per thread
# each) in flight. The grid runs token blocks fastest, so the programs in flight read the same few
# 64-column strips of W_dec (d_sae * 128 bytes = 7 MiB each at d_sae=57344): the gathers hit L2.
DECODE_FWD_CONFIG = {"BLOCK_B": 32, "BLOCK_D": 64, "UNROLL": 4, "num_warps": 4, "num_stages": 1}
DW_MODES = ("sorted", "atomic")


@triton.jit
def _sparse_decode_fwd_kernel(
    indices_ptr,  # [B, K] int64
    values_ptr,  # [B, K]
    w_ptr,  # [d_sae, d]
    bias_ptr,  # [d]
    out_ptr,  # [B, d]
    stride_idx_b,
    stride_w_m,
    stride_out_b,
    B,
    K,
    d,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UNROLL: tl.constexpr,
):
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B] tokens
    mask_b = offs_b < B
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask_d = offs_d < d
    code_row = offs_b.to(tl.int64) * stride_idx_b  # [BLOCK_B]
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for j0 in range(0, K, UNROLL):
        # UNROLL independent gathers per step, so their loads can be in flight together.
        for u in tl.static_range(UNROLL):
            mask_j = mask_b & (offs_b * 0 + j0 + u < K)  # [BLOCK_B] (a tensor: the interpreter wants one)
            idx = tl.load(indices_ptr + code_row + j0 + u, mask=mask_j, other=0)  # [BLOCK_B]
            v = tl.load(values_ptr + code_row + j0 + u, mask=mask_j, other=0.0).to(tl.float32)
            # Zero-valued slots (padding, inactive top-k picks) add nothing: their row is not fetched.
            w = tl.load(w_ptr + idx[:, None] * stride_w_m + offs_d[None, :],
                        mask=(v != 0.0)[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_B, BLOCK_D]
            acc += v[:, None] * w.to(tl.float32)
    acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_b.to(tl.int64)[:, None] * stride_out_b + offs_d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask_b[:, None] & mask_d[None, :])


@triton.jit
def _sparse_decode_dvalues_kernel(
    indices_ptr,  # [B, K] int64
    g_ptr,  # [B, d]
    w_ptr,  # [d_sae, d]
    dvalues_ptr,  # [B, K]
    stride_idx_b,
    stride_g_b,
    stride_w_m,
    K,
    d,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    idx = tl.load(indices_ptr + pid_b * stride_idx_b + offs_k, mask=mask_k, other=0)  # [BLOCK_K]
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < d
        g = tl.load(g_ptr + pid_b * stride_g_b + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + idx[:, None] * stride_w_m + offs_d[None, :],
                    mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_D]
        acc += tl.sum(w * g[None, :], axis=1)
    tl.store(dvalues_ptr + pid_b * stride_idx_b + offs_k, acc.to(dvalues_ptr.dtype.element_ty), mask=mask_k)


@triton.jit
def _sparse_decode_dw_atomic_kernel(
    indices_ptr,  # [B, K] int64
    values_ptr,  # [B, K]
    g_ptr,  # [B, d]
    dw_ptr,  # [d_sae, d] fp32, zero-filled
    stride_idx_b,
    stride_g_b,
    stride_dw_m,
    K,
    d,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d
    g = tl.load(g_ptr + pid_b * stride_g_b + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(values_ptr + pid_b * stride_idx_b + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        # Zero-valued slots (padding) are skipped: they add nothing and all point at one latent.
        mask_k = (offs_k < K) & (v != 0.0)
        idx = tl.load(indices_ptr + pid_b * stride_idx_b + offs_k, mask=mask_k, other=0)
        tl.atomic_add(dw_ptr + idx[:, None] * stride_dw_m + offs_d[None, :], v[:, None] * g[None, :],
                      mask=mask_k[:, None] & mask_d[None, :], sem="relaxed")


def _check(indices: Tensor, values: Tensor, W_dec: Tensor) -> tuple[int, int, int, int]:
    check_float("W_dec", W_dec, tuple(W_dec.shape))
    if W_dec.ndim != 2:
        raise ValueError(f"W_dec: expected [d_sae, d]; got shape {tuple(W_dec.shape)}")
    d_sae, d = W_dec.shape
    check_indices(indices, values, d_sae)
    B, K = indices.shape
    check_float("values", values, (B, K), W_dec.dtype)
    if indices.stride(-1) != 1 or values.stride() != indices.stride():
        raise ValueError(f"indices/values: expected equal row-major strides; got {indices.stride()} "
                         f"and {values.stride()}")
    return B, K, d_sae, d


def sparse_decode_fwd(indices: Tensor, values: Tensor, W_dec: Tensor, bias: Tensor) -> Tensor:
    """recon [B, d] = sum_j values[:, j] * W_dec[indices[:, j]] + bias, in W_dec's dtype."""
    indices, values = indices.contiguous(), values.contiguous()
    B, K, d_sae, d = _check(indices, values, W_dec)
    check_float("bias", bias, (d,), W_dec.dtype)
    out = torch.empty(B, d, dtype=W_dec.dtype, device=W_dec.device)
    cfg = DECODE_FWD_CONFIG
    launch(_sparse_decode_fwd_kernel, (triton.cdiv(B, cfg["BLOCK_B"]), triton.cdiv(d, cfg["BLOCK_D"])),
           W_dec.device, indices, values, W_dec, bias, out, indices.stride(0), W_dec.stride(0),
           out.stride(0), B, K, d, BLOCK_B=cfg["BLOCK_B"], BLOCK_D=cfg["BLOCK_D"], UNROLL=cfg["UNROLL"],
           num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def sparse_decode_dvalues(indices: Tensor, g: Tensor, W_dec: Tensor, values: Tensor) -> Tensor:
    """dvalues [B, K] = <g[b], W_dec[indices[b, j]]> for every slot (padding included)."""
    B, K, d_sae, d = _check(indices, values, W_dec)
    check_float("grad", g, (B, d))
    dvalues = torch.empty(B, K, dtype=values.dtype, device=values.device)
    launch(_sparse_decode_dvalues_kernel, (B, triton.cdiv(K, BLOCK_K)), W_dec.device,
           indices, g, W_dec, dvalues, indices.stride(0), g.stride(0), W_dec.stride(0), K, d,
           BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, num_warps=4)
    return dvalues


def sparse_decode_dw(indices: Tensor, values: Tensor, g: Tensor, d_sae: int, mode: str = "sorted",
                     csr: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """dW_dec [d_sae, d] = sum over slots of values * g[token], by latent sort or by atomics."""
    B, K = indices.shape
    d = g.shape[1]
    check_indices(indices, values, d_sae)
    check_float("grad", g, (B, d))
    if mode == "sorted":
        dw = torch.empty(d_sae, d, dtype=g.dtype, device=g.device)
        latent_row_sum(g, indices, values, d_sae, dw, csr=csr)
        return dw
    if mode == "atomic":
        dw32 = torch.zeros(d_sae, d, dtype=torch.float32, device=g.device)
        launch(_sparse_decode_dw_atomic_kernel, (B, triton.cdiv(d, BLOCK_D)), g.device,
               indices, values, g, dw32, indices.stride(0), g.stride(0), dw32.stride(0), K, d,
               BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, num_warps=4)
        return dw32.to(g.dtype)
    raise ValueError(f"unknown dW_dec mode {mode!r}; allowed: {DW_MODES}")


class SparseDecodeFunction(torch.autograd.Function):
    """Autograd wrapper: (indices, values, W_dec, bias, dw_mode) -> recon; gradients for the last three."""

    @staticmethod
    def forward(ctx, indices: Tensor, values: Tensor, W_dec: Tensor, bias: Tensor, dw_mode: str) -> Tensor:
        indices, values = indices.contiguous(), values.contiguous()
        ctx.save_for_backward(indices, values, W_dec)
        ctx.dw_mode = dw_mode
        return sparse_decode_fwd(indices, values, W_dec, bias)

    @staticmethod
    def backward(ctx, g: Tensor):
        indices, values, W_dec = ctx.saved_tensors
        g = g.contiguous()
        dvalues = dW_dec = dbias = None
        if ctx.needs_input_grad[1]:
            dvalues = sparse_decode_dvalues(indices, g, W_dec, values)
        if ctx.needs_input_grad[2]:
            csr = latent_csr(indices, values, W_dec.shape[0]) if ctx.dw_mode == "sorted" else None
            dW_dec = sparse_decode_dw(indices, values, g, W_dec.shape[0], ctx.dw_mode, csr)
        if ctx.needs_input_grad[3]:
            dbias = g.sum(0, dtype=torch.float32).to(g.dtype)  # [d]: one reduction, fp32 accumulate
        return None, dvalues, dW_dec, dbias, None


def decode(indices: Tensor, values: Tensor, W_dec: Tensor, bias: Tensor, dw_mode: str = "sorted") -> Tensor:
    """recon [B, d] = sum_j values[b, j] * W_dec[indices[b, j]] + bias; gradients to values, W_dec, bias."""
    if dw_mode not in DW_MODES:
        raise ValueError(f"unknown dW_dec mode {dw_mode!r}; allowed: {DW_MODES}")
    return SparseDecodeFunction.apply(indices, values, W_dec, bias, dw_mode)
