"""The backend interface every SAE backend implements, and the chunked encode the sparse ones share.

A backend is a module (`reference.py`, `torch_sparse.py`, `triton_ops.py`; `dispatch.backend_ops`
returns it) with four functions:

    encode(x, shift, W_enc, b_enc, rules, *, chunk_rows=None) -> list[Selection]
        pre = (x - shift) @ W_enc + b_enc [B, d_sae], then per rule its Selection [B, K]
        (kernels/selection.py). `pre` values are differentiable w.r.t. shift, W_enc and b_enc.
    decode(code, W_dec, bias) -> recon [B, d]
        recon = sum_j code.values[:, j] * W_dec[code.indices[:, j]] + bias; differentiable w.r.t.
        code.values, W_dec and bias.
    remove_parallel_grad_(W, G) -> G       in place, G_i -= <G_i, W_i> / ||W_i||^2 W_i
    normalize_rows_(W) -> W                in place, W_i /= ||W_i||

The sparse backends (torch, triton) compute pre in chunks of rows (`encode_rows` below): each chunk
is one cuBLAS/MKL `addmm` into a [rows, d_sae] tensor in the compute dtype, then each rule's select
runs on it and the chunk is freed. Only the selections outlive a chunk.

Centering: the chunk's input is x - shift formed in the compute dtype, then addmm(b_enc, x - shift,
W_enc) -- the reference's arithmetic. Folding the shift into the bias instead,
x @ W_enc + (b_enc - shift @ W_enc), would read W_enc once more for the mat-vec (d * d_sae * 2 bytes:
0.82 GB at d=7168, d_sae=57344, ~0.19 ms at 4.3 TB/s, against 2 * B * d * 2 = 0.23 GB, ~0.05 ms, to
center an 8192-token batch), and in bf16 it rounds x @ W_enc and the folded bias, each of the size of
the uncentered pre-activations, before they cancel (an error of 2^-9 x |mean @ W_enc| where the
reference has 2^-9 x |pre|). Both costs are unmeasured on a GPU; the centering is the cheaper and
exact one on paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from .selection import BatchTopK, RowTopK, Selection, SelectionRule, Threshold, check_rules, pack_rows
from .sparse_code import SparseCode

# Memory budget of one pre-activation chunk [rows, d_sae] in the compute dtype. The dense step holds
# the whole [B, d_sae] pre-activations plus the features and their gradients (>= 3 such tensors), so
# a chunk of at most one [B, d_sae] tensor keeps the sparse step's peak below the dense step's; 1 GiB
# runs the seed's shape (B=8192, d_sae=57344, bf16: 0.94 GB) in one chunk and d_sae=262144 at
# B=4096 (2 GiB) in two.
ENCODE_CHUNK_BYTES = 1 << 30


class Backend(Protocol):
    """What `dispatch.backend_ops(name)` returns (see the module docstring for the math)."""

    def encode(self, x: Tensor, shift: Tensor, W_enc: Tensor, b_enc: Tensor,
               rules: Sequence[SelectionRule], *, chunk_rows: int | None = None) -> list[Selection]: ...

    def decode(self, code: SparseCode, W_dec: Tensor, bias: Tensor) -> Tensor: ...

    def remove_parallel_grad_(self, W: Tensor, G: Tensor) -> Tensor: ...

    def normalize_rows_(self, W: Tensor) -> Tensor: ...


class ChunkSelector(Protocol):
    """A sparse backend's selects on one pre-activation chunk pre [rows, d_sae] (contiguous)."""

    def row_topk(self, pre: Tensor, rule: RowTopK) -> Selection:
        """[rows, rule.k]."""

    def threshold(self, pre: Tensor, rule: Threshold) -> Selection:
        """[rows, K]: K = rule.capacity (CapacityExceeded when a row needs more), else the chunk's
        widest row (at least 1)."""

    def top_positions(self, values: Tensor, count: int) -> Tensor:
        """int64 [count]: flat row-major positions of the `count` largest entries of the 2-D `values`."""


def check_encode_args(x: Tensor, shift: Tensor, W_enc: Tensor, b_enc: Tensor,
                      rules: Sequence[SelectionRule]) -> tuple[int, int, int]:
    """(B, d, d_sae) after checking shapes, one float dtype and device, and the rules."""
    if x.ndim != 2 or W_enc.ndim != 2 or x.shape[1] != W_enc.shape[0]:
        raise ValueError(
            f"encode expects x [B, d] and W_enc [d, d_sae]; got {tuple(x.shape)} and {tuple(W_enc.shape)}")
    (B, d), d_sae = x.shape, W_enc.shape[1]
    if tuple(shift.shape) != (d,) or tuple(b_enc.shape) != (d_sae,):
        raise ValueError(f"encode expects shift [{d}] and b_enc [{d_sae}]; got {tuple(shift.shape)} and "
                         f"{tuple(b_enc.shape)}")
    for name, t in (("shift", shift), ("W_enc", W_enc), ("b_enc", b_enc)):
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"encode expects one float dtype and device: x is {x.dtype} on {x.device}, "
                             f"{name} {t.dtype} on {t.device}; cast them first")
    if not x.is_floating_point():
        raise ValueError(f"encode expects floating-point inputs; got {x.dtype}")
    check_rules(rules, d_sae, x.device)
    return B, d, d_sae


def pre_activations(x: Tensor, shift: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """pre = (x - shift) @ W_enc + b_enc: [rows, d] -> [rows, d_sae], one addmm in x's dtype."""
    return torch.addmm(b_enc, x - shift, W_enc)


def chunk_rows_for(d_sae: int, dtype: torch.dtype, chunk_rows: int | None = None) -> int:
    """Rows per pre-activation chunk: `chunk_rows` when given, else what fits ENCODE_CHUNK_BYTES."""
    if chunk_rows is not None:
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive int or None; got {chunk_rows!r}")
        return chunk_rows
    return max(1, ENCODE_CHUNK_BYTES // (d_sae * torch.finfo(dtype).bits // 8))


@torch.no_grad()
def encode_rows(x: Tensor, shift: Tensor, W_enc: Tensor, b_enc: Tensor, rules: Sequence[SelectionRule],
                selector: ChunkSelector, chunk_rows: int | None = None) -> list[Selection]:
    """Every rule's Selection of pre = (x - shift) @ W_enc + b_enc, chunk by chunk (no autograd).

    RowTopK and Threshold select within each chunk's rows. BatchTopK keeps each chunk's B*k largest
    entries as candidates (the batch's B*k largest are among them: an entry with fewer than B*k
    larger ones in the batch has fewer in its chunk) and selects the B*k largest candidates at the
    end; with one chunk the first step is the selection.
    """
    B, _, d_sae = check_encode_args(x, shift, W_enc, b_enc, rules)
    rows = chunk_rows_for(d_sae, x.dtype, chunk_rows)
    pieces: list[list] = [[] for _ in rules]
    for r0 in range(0, B, rows):
        pre = pre_activations(x[r0:r0 + rows], shift, W_enc, b_enc)  # [rows, d_sae]
        for piece, rule in zip(pieces, rules):
            if isinstance(rule, RowTopK):
                piece.append(selector.row_topk(pre, rule))
            elif isinstance(rule, Threshold):
                piece.append(selector.threshold(pre, rule))
            else:
                positions = selector.top_positions(pre, min(B * rule.k, pre.numel()))  # [n]
                piece.append((pre.view(-1)[positions], positions + r0 * d_sae))
        del pre
    return [_assemble(rule, piece, B, d_sae, x, selector) for rule, piece in zip(rules, pieces)]


def _assemble(rule: SelectionRule, piece: list, B: int, d_sae: int, x: Tensor,
              selector: ChunkSelector) -> Selection:
    """One rule's Selection [B, K] from its per-chunk results."""
    if not piece:  # an empty batch
        K = rule.k if isinstance(rule, RowTopK) else (rule.capacity or 1)
        empty = torch.zeros(0, K, device=x.device)
        return Selection(empty.long(), empty.to(x.dtype), empty.bool())
    if isinstance(rule, BatchTopK):
        values, positions = (torch.cat(part) for part in zip(*piece))  # [n], [n]
        if len(piece) > 1:
            best = selector.top_positions(values.view(1, -1), B * rule.k)  # [B*k]
            values, positions = values[best], positions[best]
        positions, order = torch.sort(positions)
        return pack_rows(positions // d_sae, positions % d_sae, values[order], B, rule.capacity)
    if len(piece) == 1:
        return piece[0]
    K = max(sel.indices.shape[1] for sel in piece)  # chunks of a capacity-less Threshold differ
    return Selection(*(torch.cat([_pad(t, K) for t in parts]) for parts in zip(*piece)))


def _pad(t: Tensor, K: int) -> Tensor:
    """[rows, K'] -> [rows, K], new slots zero (padding: index 0, pre 0, valid False)."""
    return t if t.shape[1] == K else torch.nn.functional.pad(t, (0, K - t.shape[1]))


def flat_selections(selections: Sequence[Selection]) -> tuple[Tensor, ...]:
    """(indices_0, pre_0, valid_0, indices_1, ...): an autograd Function's outputs."""
    return tuple(t for sel in selections for t in sel)


def grouped_selections(outputs: Sequence[Tensor]) -> list[Selection]:
    """The inverse of `flat_selections`."""
    return [Selection(*outputs[i:i + 3]) for i in range(0, len(outputs), 3)]
