"""Dense pure-torch references of every SAE op: the specification, the CPU oracle of the kernels.

Notation (used across saetron): B tokens, d = d_in, m = d_sae, k active latents per token.

    encode:  pre = (x - shift) @ W_enc + b_enc            # [B, m]
             f   = act(pre)                               # relu, or topk-then-relu
    decode:  recon = f @ W_dec + bias                     # [B, d]
    decoder-norm projection (before the optimizer step):
             G_i <- G_i - <G_i, W_i> / ||W_i||^2 * W_i    (each row i of W_dec and its gradient G)
    renormalization (after it):
             W_i <- W_i / ||W_i||

`shift` [d] is what is subtracted from the input before the encoder GEMM: the activation mean
(centering) plus b_dec when `apply_b_dec_to_input`. `bias` [d] is what is added after the decoder:
b_dec plus the activation mean (un-centering). Folding both into the ops lets the kernels fuse
them; the references here compute them densely and autograd gives every gradient.

Every function is differentiable with plain autograd and works for any float dtype (the math runs
in the input dtype; callers upcast where they need fp32).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sparse_code import SparseCode

ACTIVATIONS = ("relu", "topk")


def activate_ref(pre: Tensor, activation: str, k: int | None = None) -> Tensor:
    """f = act(pre), dense. relu: max(pre, 0). topk: the k largest pre per row, then ReLU.

    pre: [B, m] -> f: [B, m] (same dtype). Ties in topk are broken as `torch.topk` breaks them.
    """
    if activation == "relu":
        return torch.relu(pre)
    if activation == "topk":
        if k is None:
            raise ValueError("activation='topk' needs k (an int in [1, d_sae]); got k=None")
        values, indices = torch.topk(pre, k, dim=-1, sorted=False)  # [B, k]
        return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
    raise ValueError(f"unknown activation {activation!r}; allowed: {ACTIVATIONS}")


def encode_ref(
    x: Tensor,  # [B, d]
    shift: Tensor,  # [d]
    W_enc: Tensor,  # [d, m]
    b_enc: Tensor,  # [m]
    activation: str,
    k: int | None = None,
) -> Tensor:
    """f = act((x - shift) @ W_enc + b_enc), dense [B, m]."""
    pre = (x - shift) @ W_enc + b_enc  # [B, m]
    return activate_ref(pre, activation, k)


def decode_ref(f: Tensor, W_dec: Tensor, bias: Tensor) -> Tensor:
    """recon = f @ W_dec + bias: f [B, m], W_dec [m, d], bias [d] -> [B, d]."""
    return f @ W_dec + bias


def sparse_code_ref(f: Tensor, width: int | None = None) -> SparseCode:
    """Dense activations f [B, m] -> SparseCode with K = width (default: the largest row count).

    Picks each row's K largest values; rows with fewer than K active latents get zero padding.
    """
    if width is None:
        width = int((f > 0).sum(-1).max().item()) if f.numel() else 0
    width = max(1, min(width, f.shape[-1]))
    values, indices = torch.topk(f, width, dim=-1)  # [B, K]
    return SparseCode(indices=indices, values=torch.relu(values))


def sparse_decode_ref(code: SparseCode, W_dec: Tensor, bias: Tensor) -> Tensor:
    """recon_b = sum_j values[b, j] * W_dec[indices[b, j]] + bias, by a gather: [B, d]."""
    rows = W_dec[code.indices]  # [B, K, d]
    return torch.einsum("bk,bkd->bd", code.values.to(rows.dtype), rows) + bias


def remove_parallel_grad_ref(W: Tensor, G: Tensor) -> Tensor:
    """G with each row's component along the matching row of W removed. W, G: [m, d] -> [m, d].

    G_i - (<G_i, W_i> / ||W_i||^2) W_i, computed in fp32; a zero row of W leaves G_i unchanged.
    """
    W32, G32 = W.float(), G.float()
    dot = (W32 * G32).sum(-1, keepdim=True)  # [m, 1]
    sq = (W32 * W32).sum(-1, keepdim=True)  # [m, 1]
    coef = torch.where(sq > 0, dot / sq.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(dot))
    return (G32 - coef * W32).to(G.dtype)


def normalize_rows_ref(W: Tensor, eps: float = 1e-12) -> Tensor:
    """Each row of W [m, d] at unit L2 norm (computed in fp32; a zero row stays zero)."""
    W32 = W.float()
    return (W32 / W32.norm(dim=-1, keepdim=True).clamp_min(eps)).to(W.dtype)
