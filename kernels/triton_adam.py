"""Adam in Triton, with the SAE decoder's norm constraint fused into W_dec's update.

Adam (torch.optim.Adam's math with no weight decay, no amsgrad), per element, at step t, with g the
gradient times the clip factor c (a device scalar; 1 without clipping):

    m <- m + (1 - beta1) (g - m)                                (torch's lerp form)
    v <- beta2 v + (1 - beta2) g^2
    p <- p - step_size * m / (sqrt(v) / bc2_sqrt + eps)        step_size = lr / (1 - beta1^t),
                                                                bc2_sqrt = sqrt(1 - beta2^t)

W_dec [rows, d] (under FSDP2 the local shard: rows are latents, so everything stays on the rank),
one program per row with the whole row in registers (BLOCK_D = next_pow2(d) <= MAX_FUSED_D):

    g_i = c * (G_i - <G_i, W_i> / ||W_i||^2 W_i)      the decoder-parallel projection (W_i = 0: G_i)
    Adam on (W_i, g_i, m_i, v_i)
    W_i <- W_i / max(||W_i||, 1e-12)                  the renormalization

One pass: per fp32 element W, G, m, v read and W, m, v written, 28 bytes, against 48 to 56 for the
projection kernel, Adam and the renormalization kernel run one after the other (the projection
writes G back, the renormalization reads W twice). At d_sae=57344, d=7168 (411M elements) that is
11.5 GB against 20-23 GB: ~2.7 ms against ~5 ms at 4.3 TB/s (unmeasured). The projected gradient
is not written back: W_dec.grad keeps what the backward wrote.

`decoder_grad_sq` gives the per-row ||g_i||^2 of the projected gradient (reads W and G: 8 bytes an
element) for the global gradient norm that clipping needs; `adam_` is plain Adam over any tensor.
Dtypes: any float storage; all math in fp32, each stored value rounded once to its tensor's dtype.
Reference: torch.optim.Adam after reference.remove_parallel_grad_ref, then normalize_rows_ref.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import check_float, launch

# A row of fp32 W, G, m, v in registers: 16 values each a thread (<= 32 warps). At d=7168 (16 warps)
# the AOT audit reads 98 registers: one program (one row, 115 KB of loads in flight) per SM.
MAX_FUSED_D = 32768
EPS_NORM = 1e-12  # normalize_rows_ref's clamp: a zero row stays zero
TINY = 1.1754943508222875e-38  # float32 tiny, as remove_parallel_grad_ref clamps ||W_i||^2
ADAM_BLOCK = 2048  # elements per program of the flat Adam: 16 a thread at 4 warps, 16-byte loads


@triton.jit
def _adam_kernel(
    p_ptr,  # [n], updated
    g_ptr,  # [n]
    m_ptr,  # [n], updated
    v_ptr,  # [n], updated
    scale_ptr,  # [1] fp32 clip factor (read only when HAS_SCALE)
    n,
    beta1,
    beta2,
    eps,
    step_size,
    bc2_sqrt,
    HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g * tl.load(scale_ptr)
    m = m + (1.0 - beta1) * (g - m)
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p - step_size * (m / (tl.sqrt_rn(v) / bc2_sqrt + eps))
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _remove_parallel(w, g, TINY: tl.constexpr):
    """g - <g, w> / ||w||^2 w for one row (0 coefficient for a zero row), fp32."""
    sq = tl.sum(w * w, axis=0)
    coef = tl.where(sq > 0.0, tl.sum(w * g, axis=0) / tl.maximum(sq, TINY), 0.0)
    return g - coef * w


@triton.jit
def _decoder_adam_kernel(
    w_ptr,  # [rows, d], updated
    g_ptr,  # [rows, d]
    m_ptr,  # [rows, d], updated
    v_ptr,  # [rows, d], updated
    scale_ptr,  # [1] fp32 clip factor (read only when HAS_SCALE)
    stride_w,
    stride_g,
    stride_m,
    stride_v,
    d,
    beta1,
    beta2,
    eps,
    step_size,
    bc2_sqrt,
    HAS_SCALE: tl.constexpr,
    TINY: tl.constexpr,
    EPS_NORM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < d
    w = tl.load(w_ptr + row * stride_w + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + row * stride_m + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + row * stride_v + offs, mask=mask, other=0.0).to(tl.float32)
    g = _remove_parallel(w, g, TINY)
    if HAS_SCALE:
        g = g * tl.load(scale_ptr)
    m = m + (1.0 - beta1) * (g - m)
    v = beta2 * v + (1.0 - beta2) * g * g
    tl.store(m_ptr + row * stride_m + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + row * stride_v + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
    w = w - step_size * (m / (tl.sqrt_rn(v) / bc2_sqrt + eps))
    w = w / tl.maximum(tl.sqrt_rn(tl.sum(w * w, axis=0)), EPS_NORM)
    tl.store(w_ptr + row * stride_w + offs, w.to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decoder_grad_sq_kernel(
    w_ptr,  # [rows, d]
    g_ptr,  # [rows, d]
    out_ptr,  # [rows] fp32: ||projected gradient row||^2
    stride_w,
    stride_g,
    d,
    TINY: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < d
    w = tl.load(w_ptr + row * stride_w + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    g = _remove_parallel(w, g, TINY)
    tl.store(out_ptr + row, tl.sum(g * g, axis=0))


def _row_launch(d: int) -> dict:
    """BLOCK_D and warps of the one-row kernels: 16 values of each row tensor a thread (4..32 warps)."""
    if d > MAX_FUSED_D:
        raise ValueError(f"the fused decoder kernels hold a row in registers, d <= {MAX_FUSED_D}; got d={d}: "
                         "use SAEAdam(fused_decoder=False)")
    block = triton.next_power_of_2(d)
    return {"BLOCK_D": block, "num_warps": max(4, min(32, block // 512))}


def _hyper(lr: float, beta1: float, beta2: float, eps: float, step: int) -> tuple:
    """(beta1, beta2, eps, step_size, bc2_sqrt) for step t = `step` (>= 1), in torch.optim.Adam's terms."""
    if step < 1:
        raise ValueError(f"Adam's step count starts at 1; got {step}")
    return beta1, beta2, eps, lr / (1.0 - beta1**step), (1.0 - beta2**step) ** 0.5


def _check_state(name: str, t: Tensor, like: Tensor) -> None:
    check_float(name, t, tuple(like.shape))
    if t.device != like.device:
        raise ValueError(f"{name} on {t.device} but the parameter on {like.device}")


def adam_(p: Tensor, g: Tensor, m: Tensor, v: Tensor, *, lr: float, beta1: float, beta2: float, eps: float,
          step: int, scale: Tensor | None = None) -> None:
    """One Adam step in place on contiguous p, m, v of any shape with gradient g (times `scale`)."""
    for name, t in (("grad", g), ("exp_avg", m), ("exp_avg_sq", v)):
        _check_state(name, t, p)
    if not all(t.is_contiguous() for t in (p, g, m, v)):
        raise ValueError("adam_: parameter, gradient and states must be contiguous")
    n = p.numel()
    launch(_adam_kernel, (triton.cdiv(n, ADAM_BLOCK),), p.device, p, g, m, v,
           scale if scale is not None else g, n, *_hyper(lr, beta1, beta2, eps, step),
           HAS_SCALE=scale is not None, BLOCK=ADAM_BLOCK, num_warps=4)


def decoder_adam_(W: Tensor, G: Tensor, m: Tensor, v: Tensor, *, lr: float, beta1: float, beta2: float,
                  eps: float, step: int, scale: Tensor | None = None) -> None:
    """In place on W [rows, d] and its Adam states: projection of G, Adam, row renormalization."""
    if W.ndim != 2:
        raise ValueError(f"W: expected [rows, d]; got shape {tuple(W.shape)}")
    for name, t in (("W", W), ("grad", G), ("exp_avg", m), ("exp_avg_sq", v)):
        _check_state(name, t, W)
    rows, d = W.shape
    cfg = _row_launch(d)
    launch(_decoder_adam_kernel, (rows,), W.device, W, G, m, v, scale if scale is not None else G,
           W.stride(0), G.stride(0), m.stride(0), v.stride(0), d, *_hyper(lr, beta1, beta2, eps, step),
           HAS_SCALE=scale is not None, TINY=TINY, EPS_NORM=EPS_NORM, **cfg)


def decoder_grad_sq(W: Tensor, G: Tensor) -> Tensor:
    """[rows] fp32: the squared norm of each row of G after the decoder-parallel projection."""
    if W.ndim != 2 or G.shape != W.shape:
        raise ValueError(f"W {tuple(W.shape)} and G {tuple(G.shape)}: expected two equal [rows, d] shapes")
    check_float("W", W, tuple(W.shape))
    check_float("G", G, tuple(G.shape))
    rows, d = W.shape
    out = torch.empty(rows, dtype=torch.float32, device=W.device)
    launch(_decoder_grad_sq_kernel, (rows,), W.device, W, G, out, W.stride(0), G.stride(0), d,
           TINY=TINY, **_row_launch(d))
    return out
