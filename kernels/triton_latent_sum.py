"""Latent-sorted weighted row sums: the weight gradients of the sparse decode and of the encoder.

For a SparseCode (indices, weights) [B, K] grouped by latent (see `triton_common.latent_csr`):

    out[i, :] = sum over slots (b, j) with indices[b, j] = i of  weights[b, j] * (rows[b, :] - shift)
    colsum[i] = sum over the same slots of weights[b, j]

    sparse decode: rows = g = dL/drecon [B, d], weights = values     -> out = dW_dec [d_sae, d]
    encoder:       rows = x [B, d], shift, weights = dL/dpre          -> out = dW_enc^T, colsum = db_enc

One program per (latent, block of d) on GPU: it walks its latent's slots in token order, so the result is
deterministic and needs no atomics and no zero-fill (a latent with no slot writes zeros). Latents
are uneven (a latent active in every token has B slots) but each slot costs one row gather of
BLOCK_D elements, so the imbalance is bounded by B * BLOCK_D loads per program.
The alternative, one program per token adding into out with atomics, is in triton_decode.py.

Shapes: rows [B, d], shift [d], weights [B*K] (flat), perm [B*K] int64, offsets [d_sae + 1] int64,
out [d_sae, d] with any strides (encoder: a [d, d_sae] tensor's transpose), colsum [d_sae] fp32.
Dtypes: rows/weights/shift any float dtype, loads upcast to fp32, fp32 accumulation, out stored in
its own dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import check_float, latent_csr, launch

BLOCK_N = 16  # slots per step: 16 gathered rows x BLOCK_D in flight per program
BLOCK_D = 256  # 256 fp32 columns: 2 KiB of accumulator per program, 8 per thread at 4 warps
# Latents per program: 1 on GPU (d_sae x d/BLOCK_D programs fill the chip); 32 when interpreting,
# where each program instance costs ~10 ms of Python whatever its size.
LATENTS_GPU, LATENTS_INTERPRETED = 1, 32


@triton.jit
def _latent_row_sum_kernel(
    rows_ptr,  # [B, d]
    shift_ptr,  # [d] (read only when HAS_SHIFT)
    weights_ptr,  # [B*K]
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
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    LATENTS: tl.constexpr,
):
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    for j in range(LATENTS):
        latent = tl.program_id(0).to(tl.int64) * LATENTS + j
        in_range = latent < d_sae
        start = tl.load(offsets_ptr + latent, mask=in_range, other=0)
        end = tl.load(offsets_ptr + latent + 1, mask=in_range, other=0)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        wsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end
            slot = tl.load(perm_ptr + offs_n, mask=mask_n, other=0)  # [BLOCK_N] int64
            w = tl.load(weights_ptr + slot, mask=mask_n, other=0.0).to(tl.float32)  # [BLOCK_N]
            token = slot // K
            r = tl.load(
                rows_ptr + token[:, None] * stride_rows_b + offs_d[None, :],
                mask=mask_n[:, None] & mask_d[None, :],
                other=0.0,
            ).to(tl.float32)  # [BLOCK_N, BLOCK_D]
            acc += tl.sum(w[:, None] * r, axis=0)
            wsum += w
        total = tl.sum(wsum, axis=0)
        if HAS_SHIFT:
            # sum_s w_s (x_s - shift) = sum_s w_s x_s - (sum_s w_s) shift: the shift term once per latent.
            acc -= total * shift
        tl.store(out_ptr + latent * stride_out_m + offs_d * stride_out_d,
                 acc.to(out_ptr.dtype.element_ty), mask=mask_d & (offs_d * 0 + latent < d_sae))
        if WRITE_COLSUM:
            if pid_d == 0:
                tl.store(colsum_ptr + latent, total, mask=in_range)


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
    check_float("weights", weights, (B, K))
    if out.shape != (d_sae, d) or out.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"out: expected a float tensor [{d_sae}, {d}]; got {out.dtype} {tuple(out.shape)}")
    if shift is not None:
        check_float("shift", shift, (d,))
    if colsum is not None and (colsum.shape != (d_sae,) or colsum.dtype != torch.float32):
        raise ValueError(f"colsum: expected float32 [{d_sae}]; got {colsum.dtype} {tuple(colsum.shape)}")
    perm, offsets = csr if csr is not None else latent_csr(indices, weights, d_sae)
    weights = weights.contiguous()
    latents = LATENTS_INTERPRETED if rows.device.type == "cpu" else LATENTS_GPU
    launch(
        _latent_row_sum_kernel, (triton.cdiv(d_sae, latents), triton.cdiv(d, BLOCK_D)), rows.device,
        rows, shift if shift is not None else rows, weights, perm, offsets, out,
        colsum if colsum is not None else weights,
        rows.stride(0), out.stride(0), out.stride(1), K, d, d_sae,
        HAS_SHIFT=shift is not None, WRITE_COLSUM=colsum is not None,
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, LATENTS=latents, num_warps=4,
    )
