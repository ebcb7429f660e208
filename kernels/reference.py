"""The reference backend: every SAE op dense, in plain torch with autograd; the oracle of the others.

Notation (used across saetron): B tokens, d = d_in, m = d_sae, k active latents per token.

    encode:  pre = (x - shift) @ W_enc + b_enc             # [B, m], dense
             each rule's dense selection mask (select_mask_ref), its entries gathered per token
    decode:  recon = code.to_dense(m) @ W_dec + bias        # [B, d], dense
    decoder-norm projection (before the optimizer step):
             G_i <- G_i - <G_i, W_i> / ||W_i||^2 * W_i    (each row i of W_dec and its gradient G)
    renormalization (after it):
             W_i <- W_i / ||W_i||

`shift` [d] is what is subtracted from the input before the encoder GEMM: the activation mean
(centering) plus b_dec when `apply_b_dec_to_input`. `bias` [d] is what is added after the decoder:
b_dec plus the activation mean (un-centering). Autograd gives every gradient. The math runs in the
input dtype (callers upcast where they need fp32), except the decoder-norm ops (fp32).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .backend import check_encode_args, pre_activations
from .selection import BatchTopK, RowTopK, Selection, SelectionRule, pack_rows, threshold_values
from .sparse_code import SparseCode


def select_mask_ref(pre: Tensor, rule: SelectionRule) -> Tensor:
    """The dense selection of one rule: bool [B, m], True where `rule` selects pre [B, m].

    Ties at the boundary of a top-k are broken as torch.topk breaks them.
    """
    B, m = pre.shape
    if isinstance(rule, RowTopK):
        candidates = torch.ones(m, dtype=torch.bool, device=pre.device) if rule.mask is None else rule.mask
        k = min(rule.k, int(candidates.sum()))
        scores = pre.masked_fill(~candidates, float("-inf"))
        top = torch.topk(scores, k, dim=1).indices  # [B, k]
        return torch.zeros_like(pre, dtype=torch.bool).scatter_(1, top, True)
    if isinstance(rule, BatchTopK):
        top = torch.topk(pre.reshape(-1), B * rule.k).indices  # [B*k]
        return torch.zeros(B * m, dtype=torch.bool, device=pre.device).scatter_(0, top, True).view(B, m)
    return pre > threshold_values(rule, m, pre.device)


def selection_from_mask(pre: Tensor, mask: Tensor, width: int | None) -> Selection:
    """Gather the True entries of mask [B, m] per token into a Selection [B, K], differentiably.

    K = width (CapacityExceeded when a token has more), else the widest token (at least 1); a token's
    entries in ascending latent order, then padding.
    """
    rows, latents = mask.nonzero(as_tuple=True)  # row-major: grouped by token
    return pack_rows(rows, latents, pre[rows, latents], mask.shape[0], width)


def encode(x: Tensor, shift: Tensor, W_enc: Tensor, b_enc: Tensor, rules: Sequence[SelectionRule], *,
           chunk_rows: int | None = None) -> list[Selection]:
    """Every rule's Selection of the dense pre = (x - shift) @ W_enc + b_enc; autograd for gradients.

    `chunk_rows` is accepted for the interface and ignored: the oracle builds pre whole.
    """
    check_encode_args(x, shift, W_enc, b_enc, rules)
    pre = pre_activations(x, shift, W_enc, b_enc)  # [B, m]
    selections = []
    for rule in rules:
        width = rule.k if isinstance(rule, RowTopK) else rule.capacity
        selections.append(selection_from_mask(pre, select_mask_ref(pre.detach(), rule), width))
    return selections


def decode(code: SparseCode, W_dec: Tensor, bias: Tensor) -> Tensor:
    """recon = dense(code) @ W_dec + bias: [B, d] (the [B, m] dense features are built)."""
    return decode_ref(code.to_dense(W_dec.shape[0]).to(W_dec.dtype), W_dec, bias)


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


@torch.no_grad()
def remove_parallel_grad_(W: Tensor, G: Tensor) -> Tensor:
    """In place on G: remove_parallel_grad_ref. Returns G."""
    return G.copy_(remove_parallel_grad_ref(W, G))


@torch.no_grad()
def normalize_rows_(W: Tensor) -> Tensor:
    """In place on W: normalize_rows_ref. Returns W."""
    return W.copy_(normalize_rows_ref(W))
