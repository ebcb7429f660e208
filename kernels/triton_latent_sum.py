"""Latent-sorted weighted row sums: the weight gradients of the sparse decode and of the encoder.

For a SparseCode (indices, weights) [B, K] grouped by latent (see `triton_common.latent_csr`):

    out[i, :] = sum over slots (b, j) with indices[b, j] = i of  weights[b, j] * (rows[b, :] - shift)
    colsum[i] = sum over the same slots of weights[b, j]

    sparse decode: rows = g = dL/drecon [B, d], weights = values     -> out = dW_dec [d_sae, d]
    encoder:       rows = x [B, d], shift, weights = dL/dpre          -> out = dW_enc^T, colsum = db_enc

The work. The CSR lists the active slots sorted by latent, token order within a latent. A program
owns BLOCK_L consecutive latents and BLOCK_D columns; their slots form one contiguous range of the
sorted list, [offsets[l0], offsets[l0 + BLOCK_L]), which it walks in dense chunks of BLOCK_N slots
across latent boundaries (a latent has ~9 slots at d_sae=57344, k=64, B=8192: with one latent per
program most lanes of each chunk were idle and most of the time went to waiting on dependent loads,
16.2 ms on an H200 against a ~2 ms floor). Each chunk is a segmented sum, done as a small matrix
product on the tensor cores:

    acc[BLOCK_L, BLOCK_D] += S[BLOCK_L, BLOCK_N] @ R[BLOCK_N, BLOCK_D]
    R[n, :] = rows[token of slot n, d block]                     (the gathered rows)
    S[l, n] = weight of slot n if offsets[l0+l] <= n < offsets[l0+l+1], else 0   (one nonzero a column)

S holds the weights exactly (they are in the rows' dtype), each product is exact in fp32 and the
sums accumulate in fp32 in an order fixed by the CSR: deterministic, no atomics, no zero-fill (a
latent with no slot writes zeros). The tensor-core work is BLOCK_L times the useful multiply-adds
(2 * BLOCK_L * B*K * d FLOP: 0.12 TFLOP at the seed's shape) and hides under the gathers.

Grid (latent blocks, d blocks), latent blocks fastest: the programs in flight share one or two d
blocks, so what they gather, rows[:, d block] (B * BLOCK_D * 2 bytes: 4 MiB at B=8192, BLOCK_D=256,
bf16), stays in L2; each element of `rows` comes from memory about once.

Shapes: rows [B, d], shift [d], weights [B, K], perm [B*K] int64 (the sorted slot numbers b*K + j),
offsets [d_sae + 1] int64, out [d_sae, d] with any strides (encoder: the transpose of a row-major
[d, d_sae] tensor, so dW_enc lands in W_enc's layout), colsum [d_sae] fp32.
Dtypes: rows and weights share one float dtype (the tensor-core operand dtype; fp32 follows
`dot_dtypes`: tf32 only where torch allows it), shift any float dtype; fp32 accumulation, out in its
own dtype. Reference: sparse_decode_ref / reference.encode autograd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import check_float, dot_dtypes, latent_csr, launch

# Launch config (what the AOT audit compiles; the interpreter runs the same tiles). 16 latents x 256
# columns: a [16, 256] fp32 accumulator (32 values per thread at 4 warps); 32-slot chunks: a
# [32, 256] bf16 gathered tile (16 KiB: 512-byte row pieces in 16-byte cp.async copies). At the seed's
# shape a program walks ~146 slots (5 chunks); 3584 x 28 programs. Registers (AOT audit, sm_90a):
# 96 with triton 3.9, 117-119 with 3.6: 4-5 programs (64-80 KiB of gathers) in flight per SM;
# 32 latents x 128 columns took 124-168. bench/gpu/kernels.py times the alternatives.
LATENT_SUM_CONFIG = {"BLOCK_L": 16, "BLOCK_N": 32, "BLOCK_D": 256, "num_warps": 4, "num_stages": 3}


@triton.jit
def _latent_row_sum_kernel(
    rows_ptr,  # [B, d]
    shift_ptr,  # [d] (read only when HAS_SHIFT)
    weights_ptr,  # [B*K] (flat)
    perm_ptr,  # [B*K] int64: slot numbers grouped by latent
    offsets_ptr,  # [d_sae + 1] int64
    out_ptr,  # [d_sae, d] (strided)
    colsum_ptr,  # [d_sae] fp32 (written only when WRITE_COLSUM)
    stride_rows_b,
    stride_out_m,
    stride_out_d,
    K,
    d,
    d_sae,
    HAS_SHIFT: tl.constexpr,
    WRITE_COLSUM: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)  # [BLOCK_L] latents
    mask_l = offs_l < d_sae
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask_d = offs_d < d
    # Each latent's slot range (positions < B*K < 2**31: int32, checked by the launcher); latents past
    # d_sae get an empty one (their keys were never sorted in).
    seg_start = tl.load(offsets_ptr + offs_l, mask=mask_l, other=0).to(tl.int32)  # [BLOCK_L]
    seg_end = tl.load(offsets_ptr + offs_l + 1, mask=mask_l, other=0).to(tl.int32)  # [BLOCK_L]
    start = tl.load(offsets_ptr + pid_l * BLOCK_L).to(tl.int32)
    end = tl.load(offsets_ptr + tl.minimum(pid_l * BLOCK_L + BLOCK_L, d_sae)).to(tl.int32)
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    wsum = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] positions in the sorted list
        mask_n = offs_n < end
        slot = tl.load(perm_ptr + offs_n, mask=mask_n, other=0).to(tl.int32)  # [BLOCK_N] b*K + j
        w = tl.load(weights_ptr + slot, mask=mask_n, other=0.0)  # [BLOCK_N]
        token = (slot // K).to(tl.int64)
        r = tl.load(rows_ptr + token[:, None] * stride_rows_b + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        member = (offs_n[None, :] >= seg_start[:, None]) & (offs_n[None, :] < seg_end[:, None])
        s = tl.where(member, w[None, :].to(tl.float32), 0.0)  # [BLOCK_L, BLOCK_N]
        acc = tl.dot(s.to(DOT_DTYPE), r.to(DOT_DTYPE), acc, input_precision=PRECISION)
        wsum += tl.sum(s, axis=1)
    if HAS_SHIFT:
        # sum_s w_s (x_s - shift) = sum_s w_s x_s - (sum_s w_s) shift: the shift term once per latent.
        shift = tl.load(shift_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        acc -= wsum[:, None] * shift[None, :]
    out_ptrs = (out_ptr + offs_l[:, None].to(tl.int64) * stride_out_m
                + offs_d[None, :].to(tl.int64) * stride_out_d)  # [BLOCK_L, BLOCK_D]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_l[:, None] & mask_d[None, :])
    if WRITE_COLSUM:
        if pid_d == 0:
            tl.store(colsum_ptr + offs_l, wsum, mask=mask_l)


def latent_row_sum(
    rows: Tensor,  # [B, d]
    indices: Tensor,  # [B, K] int64
    weights: Tensor,  # [B, K]
    d_sae: int,
    out: Tensor,  # [d_sae, d], written
    shift: Tensor | None = None,  # [d]
    colsum: Tensor | None = None,  # [d_sae] fp32, written
    csr: tuple[Tensor, Tensor] | None = None,
) -> None:
    """out[i] = sum_{slots of latent i} weights * (rows[token] - shift); colsum[i] = sum of weights."""
    B, d = rows.shape
    K = indices.shape[1]
    check_float("rows", rows, (B, d))
    check_float("weights", weights, (B, K), rows.dtype)
    if out.shape != (d_sae, d) or out.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"out: expected a float tensor [{d_sae}, {d}]; got {out.dtype} {tuple(out.shape)}")
    if shift is not None:
        check_float("shift", shift, (d,))
    if colsum is not None and (colsum.shape != (d_sae,) or colsum.dtype != torch.float32):
        raise ValueError(f"colsum: expected float32 [{d_sae}]; got {colsum.dtype} {tuple(colsum.shape)}")
    perm, offsets = csr if csr is not None else latent_csr(indices, weights, d_sae)
    weights = weights.contiguous()
    _, dot_dtype, precision = dot_dtypes(rows.dtype, rows.device)
    if B * K >= 2**31:
        raise ValueError(f"B * K = {B} * {K} slots: the kernel indexes slots in int32 (< 2**31); "
                         "split the batch")
    cfg = LATENT_SUM_CONFIG
    launch(
        _latent_row_sum_kernel, (triton.cdiv(d_sae, cfg["BLOCK_L"]), triton.cdiv(d, cfg["BLOCK_D"])),
        rows.device, rows, shift if shift is not None else rows, weights, perm, offsets, out,
        colsum if colsum is not None else weights,
        rows.stride(0), out.stride(0), out.stride(1), K, d, d_sae,
        HAS_SHIFT=shift is not None, WRITE_COLSUM=colsum is not None, DOT_DTYPE=dot_dtype,
        PRECISION=precision, BLOCK_L=cfg["BLOCK_L"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
