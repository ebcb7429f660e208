"""Fused encode in Triton: centering + GEMM with W_enc + b_enc + activation, emitted in sparse form.

    pre[b, i] = sum_c round(x[b, c] - shift[c]) W_enc[c, i] + b_enc[i]      (never stored whole)
    relu:  every i with pre[b, i] > 0
    topk:  the k largest pre[b, i], then ReLU (non-positive picks keep their slot with value 0)

`round` is the input dtype's rounding (x - shift is formed in fp32 and rounded once, as the
reference's `x - shift` in that dtype), so bf16 operands feed the tensor cores; the GEMM
accumulates in fp32. One program computes a [BLOCK_B, BLOCK_M] tile of pre and reduces it at once:

  relu: the tile's positive entries are appended to their row with one atomic counter per token
        (`counts`) and a cumsum inside the tile, into a [B, width] buffer padded with (index 0,
        value 0). Capacity, not CSR: a fixed [B, K] layout is what the decode and backward kernels
        take, and overflow is detected exactly (the counters hold the true counts). With a
        `capacity`, K = capacity and overflow raises `CapacityExceeded(max_active, capacity)` so
        the dispatcher can retry wider or go dense (early ReLU training). Without one, the buffer
        starts at min(d_sae, 256) slots, an overflow reruns once at the exact widest row, and K is
        trimmed to the batch's largest active count (saetron.kernels.torch_sparse's convention).
        Slot order within a row depends on the tiles' timing; the set of (index, value) does not.
  topk: each program walks TILES tiles (a chunk of latents) keeping a running top-KC per row, with
        KC = next_pow2(k) capped at BLOCK_M; (value, index) pairs are packed into one int64 key
        (order-preserving float bits << 32 | index) so `tl.topk` sorts both. The chunks' candidates
        [B, n_chunks * KC] (fp32 values, int32 indices: 14x fewer than d_sae at production sizes)
        go through one torch.topk for the exact k. When next_pow2(k) >= BLOCK_M (k close to
        d_sae at test sizes) a chunk is one tile and all its entries are candidates.

Neither path materializes a [B, d_sae] fp32 tensor. Backward (EncodeFunction) is the encoder
backward of triton_encoder_bwd.py with dpre = dvalues * [values > 0].
Shapes: x [B, d], shift [d], W_enc [d, d_sae] row-major, b_enc [d_sae]; one float dtype for all.
Outputs: SparseCode(indices [B, K] int64, values [B, K] in x's dtype). Reference: encode_ref.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .sparse_code import CapacityExceeded, SparseCode
from .triton_common import check_float, dot_dtypes, launch
from .triton_encoder_bwd import encoder_bwd

# GPU configs (what the AOT audit compiles), checked spill-free there. BLOCK_K = 64: 128 B bf16 rows
# per operand tile. The int64 scatter addresses of the relu epilogue and the int64 sort keys of topk
# (tile + running top-KC) live next to the fp32 accumulator, hence 64-row tiles at 8 warps: 128-row
# tiles spilled 1.7-4 KiB per thread. sm_90 keeps BLOCK_B = 64 (one wgmma M granule per warpgroup);
# sm_80 (mma.sync) halves topk's rows again: 64 rows spilled 88 B there, 32 rows at 4 warps 112 B.
RELU_CONFIG = {"BLOCK_B": 64, "BLOCK_M": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
TOPK_CONFIGS = {
    90: {"BLOCK_B": 64, "BLOCK_M": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    80: {"BLOCK_B": 32, "BLOCK_M": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
}
# The interpreter runs tl.topk's bitonic network as Python reductions (~4 s per [64, 128] sort):
# the same kernel with 16x smaller tiles keeps the CPU tests to seconds.
INTERPRETER_CONFIG = {"BLOCK_B": 16, "BLOCK_M": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
TOPK_TILES = 8  # tiles per chunk: d_sae=57344 -> 56 chunks x 64 candidates = 3584 per token
DEFAULT_RELU_CAPACITY = 256  # slots per token when the caller gives none: 4x a trained L0 of 64
# int64 key of -inf: float bits of -inf (0xFF800000) made order-preserving, index 0, shifted up.
NEG_KEY = (-8388608 ^ 0x7FFFFFFF) << 32


def topk_config(major: int) -> dict:
    """The topk launch config for a GPU of compute capability `major` (Hopper and newer: 90)."""
    return TOPK_CONFIGS[90 if major >= 9 else 80]


@triton.jit
def _encode_kernel(
    x_ptr,  # [B, d]
    shift_ptr,  # [d]
    w_ptr,  # [d, d_sae]
    b_ptr,  # [d_sae]
    values_ptr,  # relu: [B, capacity] (x dtype); topk: [B, n_chunks * KC] fp32 candidates
    indices_ptr,  # relu: [B, capacity] int64;     topk: [B, n_chunks * KC] int32 candidates
    counts_ptr,  # [B] int32 (relu only): active latents per token, zero-filled
    stride_x_b,
    stride_w_d,
    stride_out_b,
    B,
    d,
    d_sae,
    capacity,
    TOPK: tl.constexpr,
    KC: tl.constexpr,
    TILES: tl.constexpr,
    NEG_KEY: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)  # int64: B * stride can pass 2**31
    mask_b = offs_b < B
    if TOPK:
        running = tl.full((BLOCK_B, KC), NEG_KEY, tl.int64)
    for t in range(TILES):
        offs_m = (pid_c * TILES + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < d_sae
        acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < d
            mask_a = mask_b[:, None] & mask_k[None, :]
            xa = tl.load(x_ptr + offs_b[:, None] * stride_x_b + offs_k[None, :], mask=mask_a, other=0.0)
            s = tl.load(shift_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            # Centering in fp32, rounded once to the input dtype (the reference's x - shift).
            a = tl.where(mask_a, xa.to(tl.float32) - s[None, :], 0.0).to(x_ptr.dtype.element_ty)
            w = tl.load(w_ptr + offs_k[:, None].to(tl.int64) * stride_w_d + offs_m[None, :],
                        mask=mask_k[:, None] & mask_m[None, :], other=0.0)
            acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)
        acc += tl.load(b_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)[None, :]
        if TOPK:
            bits = acc.to(tl.int32, bitcast=True)
            ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed-int order = float order
            keys = (ordered.to(tl.int64) << 32) | offs_m[None, :].to(tl.int64)
            keys = tl.where(mask_m[None, :], keys, NEG_KEY)
            if KC < BLOCK_M:
                keys = tl.topk(keys, KC)  # [BLOCK_B, KC]
            if TILES > 1:
                running = tl.topk(tl.reshape(tl.join(running, keys), (BLOCK_B, 2 * KC)), KC)
            else:
                running = keys
        else:
            active = (acc > 0.0) & mask_m[None, :] & mask_b[:, None]
            active_i = active.to(tl.int32)
            base = tl.atomic_add(counts_ptr + offs_b, tl.sum(active_i, axis=1), mask=mask_b, sem="relaxed")
            slot = base[:, None] + tl.cumsum(active_i, axis=1) - 1  # [BLOCK_B, BLOCK_M]
            keep = active & (slot < capacity)
            out = offs_b[:, None] * stride_out_b + slot
            tl.store(values_ptr + out, acc.to(values_ptr.dtype.element_ty), mask=keep)
            tl.store(indices_ptr + out, offs_m[None, :].to(tl.int64) + tl.zeros_like(out), mask=keep)
    if TOPK:
        hi = (running >> 32).to(tl.int32)
        vals = tl.where(hi < 0, hi ^ 0x7FFFFFFF, hi).to(tl.float32, bitcast=True)
        idx = (running & 0xFFFFFFFF).to(tl.int32)
        out = offs_b[:, None] * stride_out_b + pid_c * KC + tl.arange(0, KC)[None, :]
        tl.store(values_ptr + out, vals, mask=mask_b[:, None])
        tl.store(indices_ptr + out, idx, mask=mask_b[:, None])


def _check(x: Tensor, shift: Tensor, W_enc: Tensor, b_enc: Tensor) -> tuple[int, int, int]:
    if x.ndim != 2 or W_enc.ndim != 2:
        raise ValueError(
            f"expected x [B, d] and W_enc [d, d_sae]; got {tuple(x.shape)} and {tuple(W_enc.shape)}"
        )
    B, d = x.shape
    d_sae = W_enc.shape[1]
    check_float("x", x, (B, d))
    check_float("W_enc", W_enc, (d, d_sae), x.dtype)
    check_float("shift", shift, (d,), x.dtype)
    check_float("b_enc", b_enc, (d_sae,), x.dtype)
    return B, d, d_sae


def _encode_relu(x: Tensor, shift: Tensor, W_enc: Tensor, b_enc: Tensor, width: int,
                 common: dict) -> tuple[Tensor, Tensor, int]:
    """One relu encode pass into `width` slots per row: (values, indices, largest active count)."""
    B, d = x.shape
    d_sae = W_enc.shape[1]
    cfg = INTERPRETER_CONFIG if x.device.type == "cpu" else RELU_CONFIG
    values = torch.zeros(B, width, dtype=x.dtype, device=x.device)
    indices = torch.zeros(B, width, dtype=torch.int64, device=x.device)
    counts = torch.zeros(B, dtype=torch.int32, device=x.device)
    grid = (triton.cdiv(B, cfg["BLOCK_B"]), triton.cdiv(d_sae, cfg["BLOCK_M"]))
    launch(_encode_kernel, grid, x.device, x, shift, W_enc, b_enc, values, indices, counts,
           x.stride(0), W_enc.stride(0), values.stride(0), B, d, d_sae, width,
           TOPK=False, KC=1, TILES=1, **common, **cfg)
    return values, indices, (int(counts.max()) if B else 0)


def encode_fwd(x: Tensor, shift: Tensor, W_enc: Tensor, b_enc: Tensor, activation: str,
               k: int | None = None, capacity: int | None = None) -> tuple[Tensor, Tensor]:
    """(values [B, K] in x's dtype, indices [B, K] int64); K = k (topk), or for relu: capacity if
    given (CapacityExceeded on overflow), else the batch's largest active count."""
    B, d, d_sae = _check(x, shift, W_enc, b_enc)
    _, dot_dtype, precision = dot_dtypes(x.dtype, x.device)
    common = dict(DOT_DTYPE=dot_dtype, PRECISION=precision, NEG_KEY=NEG_KEY)
    interpreted = x.device.type == "cpu"
    if activation == "relu":
        if capacity is not None and (isinstance(capacity, bool) or int(capacity) < 1):
            raise ValueError(f"capacity must be a positive int or None; got {capacity!r}")
        width = int(capacity) if capacity is not None else min(d_sae, DEFAULT_RELU_CAPACITY)
        values, indices, max_active = _encode_relu(x, shift, W_enc, b_enc, width, common)
        if max_active > width:
            if capacity is not None:
                raise CapacityExceeded(max_active, capacity)
            # No capacity asked: the counters hold the exact widest row, so one more pass fits it.
            width = max_active
            values, indices, max_active = _encode_relu(x, shift, W_enc, b_enc, width, common)
        if capacity is None:  # K = the batch's largest active count: no all-padding columns
            keep = max(1, max_active)
            values, indices = values[:, :keep].contiguous(), indices[:, :keep].contiguous()
        return values, indices
    if activation == "topk":
        if k is None or not 1 <= int(k) <= d_sae:
            raise ValueError(f"activation='topk' needs k in [1, d_sae={d_sae}]; got k={k}")
        k = int(k)
        if interpreted:
            cfg = INTERPRETER_CONFIG
        else:
            cfg = topk_config(torch.cuda.get_device_capability(x.device)[0])
        kc = min(triton.next_power_of_2(k), cfg["BLOCK_M"])
        n_tiles = triton.cdiv(d_sae, cfg["BLOCK_M"])
        n_chunks = n_tiles if kc == cfg["BLOCK_M"] else triton.cdiv(n_tiles, TOPK_TILES)
        tiles = triton.cdiv(n_tiles, n_chunks)  # <= TOPK_TILES, spread evenly: fewer all-masked tiles
        cand_vals = torch.empty(B, n_chunks * kc, dtype=torch.float32, device=x.device)
        cand_idx = torch.empty(B, n_chunks * kc, dtype=torch.int32, device=x.device)
        launch(_encode_kernel, (triton.cdiv(B, cfg["BLOCK_B"]), n_chunks), x.device,
               x, shift, W_enc, b_enc, cand_vals, cand_idx, cand_idx,
               x.stride(0), W_enc.stride(0), cand_vals.stride(0), B, d, d_sae, 0,
               TOPK=True, KC=kc, TILES=tiles, **common, **cfg)
        top, pos = torch.topk(cand_vals, k, dim=1, sorted=False)  # [B, k]
        indices = cand_idx.gather(1, pos).to(torch.int64)
        return torch.relu(top).to(x.dtype), indices
    raise ValueError(f"unknown activation {activation!r}; allowed: ('relu', 'topk')")


class EncodeFunction(torch.autograd.Function):
    """Autograd wrapper: values differentiable w.r.t. shift, W_enc, b_enc (x is data, no gradient)."""

    @staticmethod
    def forward(ctx, x, shift, W_enc, b_enc, activation, k, capacity):
        values, indices = encode_fwd(x, shift, W_enc, b_enc, activation, k, capacity)
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(x, shift, W_enc, indices, values)
        ctx.b_dtype = b_enc.dtype
        return values, indices

    @staticmethod
    def backward(ctx, dvalues, _dindices):
        x, shift, W_enc, indices, values = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[1:4])
        if not any(need):
            return None, None, None, None, None, None, None
        dpre = torch.where(values > 0, dvalues, torch.zeros_like(dvalues)).contiguous()  # ReLU mask
        dshift, dW_enc, db_enc = encoder_bwd(x, shift, W_enc, indices, dpre, need)
        if db_enc is not None:
            db_enc = db_enc.to(ctx.b_dtype)
        return None, dshift, dW_enc, db_enc, None, None, None


def encode(x: Tensor, shift: Tensor, W_enc: Tensor, b_enc: Tensor, activation: str,
           k: int | None = None, capacity: int | None = None) -> SparseCode:
    """SparseCode of act((x - shift) @ W_enc + b_enc); `values` carry gradients to shift, W_enc, b_enc.

    topk: K = k slots per row. relu: K = capacity slots, and CapacityExceeded(max_active, capacity)
    when a token has more active latents; with capacity=None, K = the batch's largest active count.
    Padding slots hold (index 0, value 0). x is data: it gets no gradient.
    """
    values, indices = EncodeFunction.apply(x.detach(), shift, W_enc, b_enc, activation, k, capacity)
    return SparseCode(indices=indices, values=values)
