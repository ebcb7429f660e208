"""Encoder backward in Triton, from the sparse pre-activation gradient.

With pre = (x - shift) @ W_enc + b_enc and dpre [B, d_sae] nonzero only at the code's active slots
(dpre[b, indices[b, j]] = dvalues[b, j] * [values[b, j] > 0], the ReLU mask of relu and of topk):

    db_enc[i]      = sum_b dpre[b, i]                                    # [d_sae]
    dW_enc[:, i]   = sum_b dpre[b, i] (x[b] - shift)      (only active columns are nonzero)
    dshift         = -sum_b dpre[b] @ W_enc^T = -W_enc @ db_enc          # [d]

dW_enc and db_enc come from one latent-sorted pass (triton_latent_sum.py: db_enc is the weight sum
it accumulates anyway). dshift reduces over the batch first, so it is one matrix-vector product
(d x d_sae) instead of a B x d_sae x d GEMM: `_gemv_kernel` below.

dW_enc is written straight into a row-major [d, d_sae] tensor, W_enc's layout (the latent-sum
kernel stores its [latents, columns] tiles through the transposed view, 16 latents = 32 contiguous
bytes a row), so autograd accumulates it into .grad without a transposing copy (an earlier
[d_sae, d] buffer cost one: 2.8 ms a step at d=7168, d_sae=57344 on an H200).
Dtypes: loads upcast to fp32, fp32 accumulation; dW_enc in W_enc's dtype, db_enc in b_enc's,
dshift in shift's. Reference: reference.encode (its autograd is the oracle).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import check_float, check_indices, latent_csr, launch
from .triton_latent_sum import latent_row_sum

GEMV_BLOCK_R = 32  # output rows per program: d=7168 -> 224 programs over the chip
GEMV_BLOCK_C = 128  # reduction step: a [32, 128] fp32 accumulator, 32 values per thread at 4 warps


@triton.jit
def _gemv_kernel(
    a_ptr,  # [R, C]
    v_ptr,  # [C] fp32
    out_ptr,  # [R]
    stride_a_r,
    R,
    C,
    scale,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[r] = scale * sum_c a[r, c] v[c], fp32 accumulation."""
    offs_r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        a = tl.load(a_ptr + offs_r[:, None] * stride_a_r + offs_c[None, :],
                    mask=mask_r[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        acc += a * v[None, :]
    out = tl.sum(acc, axis=1) * scale
    tl.store(out_ptr + offs_r, out.to(out_ptr.dtype.element_ty), mask=mask_r)


def gemv(a: Tensor, v: Tensor, scale: float, out_dtype: torch.dtype) -> Tensor:
    """scale * a @ v: a [R, C] (unit last stride), v [C] -> [R] in out_dtype (fp32 accumulation)."""
    R, C = a.shape
    check_float("a", a, (R, C))
    check_float("v", v, (C,))
    out = torch.empty(R, dtype=out_dtype, device=a.device)
    launch(_gemv_kernel, (triton.cdiv(R, GEMV_BLOCK_R),), a.device, a, v, out, a.stride(0), R, C, scale,
           BLOCK_R=GEMV_BLOCK_R, BLOCK_C=GEMV_BLOCK_C, num_warps=4)
    return out


def encoder_bwd(
    x: Tensor,  # [B, d]
    shift: Tensor,  # [d]
    W_enc: Tensor,  # [d, d_sae]
    indices: Tensor,  # [B, K] int64
    dpre: Tensor,  # [B, K]: dL/dpre at the code's slots (0 where inactive)
    need: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dshift [d], dW_enc [d, d_sae], db_enc [d_sae]) for the gradients flagged in `need`."""
    B, d = x.shape
    d_sae = W_enc.shape[1]
    check_float("x", x, (B, d))
    check_float("shift", shift, (d,))
    check_float("W_enc", W_enc, (d, d_sae))
    check_indices(indices, dpre, d_sae)
    need_shift, need_w, need_b = need
    db32 = torch.empty(d_sae, dtype=torch.float32, device=x.device)  # [d_sae]
    dW_enc = None
    if need_w:
        dW_enc = torch.empty(d, d_sae, dtype=W_enc.dtype, device=x.device)  # [d, d_sae], W_enc's layout
        latent_row_sum(x, indices, dpre, d_sae, dW_enc.t(), shift=shift, colsum=db32,
                       csr=latent_csr(indices, dpre, d_sae))
    else:
        flat = indices.reshape(-1)
        db32.zero_().index_add_(0, flat, dpre.reshape(-1).float())
    dshift = gemv(W_enc, db32, -1.0, shift.dtype) if need_shift else None  # -W_enc @ db_enc
    db_enc = db32.to(W_enc.dtype) if need_b else None
    return dshift, dW_enc, db_enc
