"""The torch backend's selects on one pre-activation chunk (the `ChunkSelector` of kernels/backend.py).

    row_topk       torch.topk over the chunk's rows (over the mask's columns only, when given)
    threshold      the positions of pre > theta - margin (block-screened for a scalar threshold),
                   packed per row
    top_positions  torch.topk over the flattened chunk (BatchTopK's candidates and final pick)

Ties are broken as torch.topk breaks them. Any device and float dtype; comparisons with a
per-latent theta promote to fp32 element by element (no fp32 copy of the chunk).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .selection import RowTopK, Selection, Threshold, pack_rows, threshold_values

# Block width of the threshold select's screening pass (_above_positions); 32 measured best of 8/16/32
# for ReLU on the project's 2-core CPU (d_sae 4608, B 4096, L0 ~64).
SCREEN_BLOCK = 32


def row_topk(pre: Tensor, rule: RowTopK) -> Selection:
    """[rows, k]: each row's k largest pre (among the mask's latents), ties as torch.topk breaks them."""
    rows, d_sae = pre.shape
    if rule.mask is None:
        values, indices = torch.topk(pre, rule.k, dim=1, sorted=False)  # [rows, k]
        return Selection(indices, values, torch.ones_like(indices, dtype=torch.bool))
    columns = rule.mask.nonzero().squeeze(1)  # [n] candidate latents
    n = min(rule.k, columns.numel())
    indices = torch.zeros(rows, rule.k, dtype=torch.int64, device=pre.device)
    values = torch.zeros(rows, rule.k, dtype=pre.dtype, device=pre.device)
    valid = torch.zeros(rows, rule.k, dtype=torch.bool, device=pre.device)
    if n:
        top, pos = torch.topk(pre[:, columns], n, dim=1, sorted=False)  # [rows, n]
        indices[:, :n], values[:, :n], valid[:, :n] = columns[pos], top, True
    return Selection(indices, values, valid)


def _above_positions(pre: Tensor, limit: Tensor) -> Tensor:
    """Row-major flat positions of the entries of pre [rows, d_sae] above `limit` ([1] or [d_sae]), ascending.

    With a scalar limit, blocks of SCREEN_BLOCK entries are screened by their max first and only the
    blocks holding a selected entry are searched: at L0 ~64 of 4608 (ReLU) that is ~60% of the data,
    29 ms instead of 41 ms for a plain `(pre > 0).nonzero()` at B=4096 (2 threads).
    """
    if limit.numel() > 1 or pre.shape[1] % SCREEN_BLOCK:
        return (pre > limit).view(-1).nonzero().squeeze(1)
    blocks = pre.view(-1, SCREEN_BLOCK)  # [rows * d_sae / SCREEN_BLOCK, SCREEN_BLOCK]
    hot = (blocks.amax(1) > limit).nonzero().squeeze(1)  # blocks holding a selected entry
    found = (blocks[hot] > limit).view(-1).nonzero().squeeze(1)  # positions inside those blocks
    return hot[found // SCREEN_BLOCK] * SCREEN_BLOCK + found % SCREEN_BLOCK


def threshold(pre: Tensor, rule: Threshold) -> Selection:
    """[rows, K]: every pre > theta - margin, rows packed in ascending latent order (see pack_rows)."""
    rows, d_sae = pre.shape
    flat = _above_positions(pre, threshold_values(rule, d_sae, pre.device))  # [n]
    return pack_rows(flat // d_sae, flat % d_sae, pre.view(-1)[flat], rows, rule.capacity)


def top_positions(values: Tensor, count: int) -> Tensor:
    """int64 [count]: flat positions of the `count` largest entries of values (any shape)."""
    return torch.topk(values.reshape(-1), count, sorted=False).indices
