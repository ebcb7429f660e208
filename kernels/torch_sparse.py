"""torch backend: the SAE's sparse encode, sparse decode and decoder-norm ops in plain torch (CPU, GPU).

The backend interface of kernels/backend.py, the math of the dense oracle `reference.py`. B tokens,
d = d_in, m = d_sae, K = width of a Selection / SparseCode.

    encode:  pre = (x - shift) @ W_enc + b_enc      in chunks of rows (backend.encode_rows): one
             addmm per chunk, then each rule's select (torch_select.py: torch.topk, thresholds)
    decode:  recon_b = sum_j values[b, j] * W_dec[indices[b, j]] + bias      # [B, d]: embedding_bag

Backward from the sparse gradients only: no [B, m] tensor is built after the encoder GEMM.
    decode:  dvalues[b, j] = <g_b, W_dec[i_bj]>     a sampled dense-dense product (SDDMM)   # [B, K]
             dW_dec = F^T @ g                       F^T as a latent-major CSR [m, B]        # [m, d]
             dbias  = sum_b g_b                                                             # [d]
    encode:  G      = dL/dpre at each rule's selected slots (padding 0)                     # [B, K]
             dW_enc = (G^T as CSR [m, B] @ (x - shift))^T, summed over the rules            # [d, m]
             db_enc = scatter-add of G over the latents                                     # [m]
             dshift = -W_enc @ db_enc               reduced over the batch first: one mat-vec
             dx     = G @ W_enc^T                   row-major CSR, only when x needs a gradient

Measured on the project's 2-core CPU at d=576, m=4608, B=4096, k=64 (fp32): encoder GEMM ~100 ms,
topk ~70 ms, embedding_bag decode ~12 ms, SDDMM ~16 ms, each CSR weight-gradient matmul ~15 ms,
the latent-major sort ~8 ms; the dense GEMMs these replace take 100-250 ms each.

Dtypes: the GEMM, the selects, the decode and the mat-vecs run in the parameters' dtype (mat-vecs
accumulate in fp32). torch's sparse products lack bf16/fp16 kernels (CPU: MKL CSR matmul and
sampled_addmm are fp32/fp64 only; CUDA: sampled_addmm has no bf16), so for bf16/fp16:
  - the CSR matmuls (dW_dec, dW_enc, dx) upcast their operands to fp32 and cast the result back
    (an fp32 [m, d] result lives for the cast);
  - dvalues is computed by gathers instead of sampled_addmm: the W_dec rows of a block of tokens
    [rows, K, d] times g, by torch.bmm in the compute dtype (fp32 accumulation on CUDA), blocks
    of GATHER_CHUNK_BYTES.
CSR indices are int64: MKL's int32 path measured 3x slower here.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import torch_select
from .backend import check_encode_args, encode_rows, flat_selections, grouped_selections
from .selection import Selection, SelectionRule
from .sparse_code import SparseCode

# torch's CSR matmul and sampled_addmm: the dtypes they have kernels for on every device (torch 2.13
# CPU; sampled_addmm on CUDA lacks bf16: "sampled_addmm_out_sparse_csr not implemented for BFloat16").
_SPARSE_DTYPES = (torch.float32, torch.float64)
# cuSPARSE expects each CSR row's column ids in ascending order; torch's CPU kernels do not (checked
# against a gather-and-dot on unsorted rows with repeated ids), so the sort is skipped there.
_SORTED_COLUMNS_DEVICES = ("cuda",)
# Bytes of one gathered block [rows, K, d] of W_dec rows (bf16/fp16 dvalues) and of one fp32 column
# block of W_enc (the bf16 dshift mat-vec): bounded temporaries, far below a [B, d_sae] tensor.
GATHER_CHUNK_BYTES = 256 << 20


# -- sparse layouts -----------------------------------------------------------------------------


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """A CSR tensor without invariant checks (our layouts hold them by construction)."""
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state", once per process
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def _csr_mm(A: Tensor, dense: Tensor) -> Tensor:
    """A (CSR) [r, n] @ dense [n, c] -> [r, c] dense.

    `A @ dense` runs addmm on a zero-filled result and then copies it (two extra passes over the
    output, ~5 ms each for [4608, 576]); addmm with beta=0 into an uninitialized `out` skips both:
    beta=0 never reads the output's old contents.
    """
    out = torch.empty(A.shape[0], dense.shape[1], dtype=dense.dtype, device=dense.device)
    return torch.addmm(out, A, dense, beta=0.0, out=out)


def _sparse_dtype(t: Tensor) -> torch.dtype:
    """The dtype torch's sparse products run in for operands of t's dtype (fp32 for bf16/fp16)."""
    return t.dtype if t.dtype in _SPARSE_DTYPES else torch.float32


class _LatentLayoutCache:
    """The last latent-major layout, keyed by its code's index storage and the set of active slots.

    A training step needs the layout twice, in the decode backward (dW_dec: slots whose value is not
    0) and then in the encode backward (dW_enc: slots whose gradient is not 0), for the same indices:
    when both sets of slots agree (always for relu and topk) the second use skips the sort (~8 ms of
    a ~250 ms step). The entry holds a reference to the indices, so their storage cannot be reused
    for another code while it is cached, and `_version` catches in-place edits.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._refs: tuple[Tensor, Tensor] | None = None
        self._layout: tuple[Tensor, Tensor, Tensor] | None = None

    @staticmethod
    def _key_of(indices: Tensor, d_sae: int) -> tuple:
        return (indices.data_ptr(), tuple(indices.shape), indices.stride(), indices._version, indices.device,
                d_sae)

    def get(self, indices: Tensor, active: Tensor, d_sae: int) -> tuple[Tensor, Tensor, Tensor]:
        """The layout of the slots where active [B, K] is True."""
        key = self._key_of(indices, d_sae)
        if key == self._key and torch.equal(active, self._refs[1]):
            layout = self._layout
            self._key = self._refs = self._layout = None  # each code is used at most twice
            return layout
        layout = _latent_major(indices, active, d_sae)
        self._key, self._refs, self._layout = key, (indices, active), layout
        return layout


_layout_cache = _LatentLayoutCache()


def _latent_major(indices: Tensor, active: Tensor, d_sae: int) -> tuple[Tensor, Tensor, Tensor]:
    """The active slots of a [B, K] code sorted by latent, then token: a CSR layout of F^T [m, B].

    Returns crow [m + 1], the token of each slot (the CSR column ids) [nnz] and the flat slot ids
    b * K + j [nnz] (to gather the CSR values from any [B, K] tensor). Inactive slots (value 0:
    padding, and topk picks that ReLU zeroed) are left out: they carry zero weight, and leaving
    them out keeps the padding's repeated ids out of the matmuls.
    """
    K = indices.shape[1]
    slots = active.reshape(-1).nonzero().squeeze(1)  # [nnz]
    # int32 keys: torch's CPU stable sort takes half the time of int64 ones here (12 vs 26 ms, 1 thread)
    latents, order = torch.sort(indices.reshape(-1)[slots].to(torch.int32), stable=True)  # [nnz]
    slots = slots[order]
    crow = torch.zeros(d_sae + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(torch.bincount(latents, minlength=d_sae), 0, out=crow[1:])
    return crow, slots // K, slots


def _latent_matmul(layout: tuple[Tensor, Tensor, Tensor], weights: Tensor, dense: Tensor) -> Tensor:
    """(F^T @ dense) [m, n] for F [B, m] holding `weights` [B, K] at the layout's slots; dense [B, n]."""
    crow, tokens, slots = layout
    dtype = _sparse_dtype(dense)
    Ft = _csr(crow, tokens, weights.reshape(-1)[slots].to(dtype), (crow.numel() - 1, dense.shape[0]))
    return _csr_mm(Ft, dense.to(dtype))


def _sampled_rows_dot(indices: Tensor, g: Tensor, W: Tensor) -> Tensor:
    """out[b, j] = <g[b], W[indices[b, j]]> for indices [B, K], g [B, d], W [m, d] -> [B, K] in g's dtype.

    fp32/fp64: torch.sparse.sampled_addmm computes (g @ W^T) only at the CSR pattern of `indices`,
    without the [B, K, d] gather (604 MB at B=4096, K=64, d=576) that a gather-and-bmm needs.
    bf16/fp16 (no sampled_addmm kernel): gathers of W's rows and torch.bmm, in blocks of tokens.
    """
    B, K = indices.shape
    if g.dtype not in _SPARSE_DTYPES:
        out = torch.empty(B, K, dtype=g.dtype, device=g.device)
        rows = max(1, GATHER_CHUNK_BYTES // max(1, K * W.shape[1] * W.element_size()))
        for r0 in range(0, B, rows):
            gathered = W[indices[r0:r0 + rows]]  # [rows, K, d]
            out[r0:r0 + rows] = torch.bmm(gathered, g[r0:r0 + rows, :, None].to(W.dtype)).squeeze(2)
        return out
    order = None
    if indices.device.type in _SORTED_COLUMNS_DEVICES:
        indices, order = torch.sort(indices, dim=1)
    crow = torch.arange(0, B * K + 1, K, dtype=torch.int64, device=indices.device)
    zeros = torch.zeros(B * K, dtype=g.dtype, device=g.device)
    pattern = _csr(crow, indices.reshape(-1), zeros, (B, W.shape[0]))
    out = torch.sparse.sampled_addmm(pattern, g, W.to(g.dtype).t(), beta=0.0).values().view(B, K)
    if order is not None:
        out = torch.empty_like(out).scatter_(1, order, out)
    return out


# -- encode -------------------------------------------------------------------------------------


def _masked_grad(grad: Tensor | None, sel_pre: Tensor, valid: Tensor) -> Tensor:
    """A rule's pre-activation gradient with padding slots zeroed ([B, K]; zeros when unused)."""
    if grad is None:
        return torch.zeros_like(sel_pre)
    return torch.where(valid, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))


def _matvec_fp32(W: Tensor, v: Tensor) -> Tensor:
    """W [d, m] @ v [m] with fp32 (or fp64) accumulation, in column blocks: no fp32 copy of all of W."""
    acc = torch.promote_types(W.dtype, torch.float32)
    if W.dtype == acc:
        return W @ v.to(acc)
    out = torch.zeros(W.shape[0], dtype=acc, device=W.device)
    step = max(1, GATHER_CHUNK_BYTES // (4 * W.shape[0]))
    for c0 in range(0, W.shape[1], step):
        out += W[:, c0:c0 + step].to(acc) @ v[c0:c0 + step].to(acc)
    return out


class SparseEncodeFunction(torch.autograd.Function):
    """(x, shift, W_enc, b_enc, rules) -> per rule (indices, pre, valid) [B, K]; gradients from the
    selected slots only."""

    @staticmethod
    def forward(ctx, x, shift, W_enc, b_enc, rules, chunk_rows):
        selections = encode_rows(x, shift, W_enc, b_enc, rules, torch_select, chunk_rows)
        outputs = flat_selections(selections)
        ctx.mark_non_differentiable(*(t for sel in selections for t in (sel.indices, sel.valid)))
        ctx.save_for_backward(x - shift, W_enc, *outputs)  # x - shift [B, d] for dW_enc
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        x_c, W_enc, *outputs = ctx.saved_tensors
        need_x, need_shift, need_W, need_b = ctx.needs_input_grad[:4]
        d_sae = W_enc.shape[1]
        grad_x = grad_W = db = None
        for (indices, pre, valid), grad in zip(grouped_selections(outputs), grads[1::3]):
            G = _masked_grad(grad, pre, valid)  # [B, K]: dL/dpre at the selected slots
            if need_W:
                layout = _layout_cache.get(indices, G != 0, d_sae)
                part = _latent_matmul(layout, G, x_c)  # [m, d]
                grad_W = part if grad_W is None else grad_W + part
            if need_b or need_shift:
                acc = torch.promote_types(G.dtype, torch.float32)  # accumulate in fp32 (fp64 stays)
                db = torch.zeros(d_sae, dtype=acc, device=G.device) if db is None else db
                db.index_add_(0, indices.reshape(-1), G.reshape(-1).to(acc))  # [m]
            if need_x:
                part = _row_matmul(indices, G, W_enc)  # [B, d]
                grad_x = part if grad_x is None else grad_x + part
        if grad_W is not None:
            grad_W = grad_W.t().contiguous().to(W_enc.dtype)  # [d, m]: the parameter's layout
        grad_b = db.to(W_enc.dtype) if need_b else None
        grad_shift = -_matvec_fp32(W_enc, db).to(W_enc.dtype) if need_shift else None  # [d]: one mat-vec
        grad_x = grad_x.to(x_c.dtype) if grad_x is not None else None
        return grad_x, grad_shift, grad_W, grad_b, None, None


def _row_matmul(indices: Tensor, G: Tensor, W_enc: Tensor) -> Tensor:
    """G (as a row-major CSR [B, m] of its nonzero slots) @ W_enc^T: [B, d] (the input gradient)."""
    B = indices.shape[0]
    active = G != 0
    row_slots = active.reshape(-1).nonzero().squeeze(1)  # row-major: already CSR order
    crow = torch.zeros(B + 1, dtype=torch.int64, device=G.device)
    torch.cumsum(active.sum(1), 0, out=crow[1:])
    dtype = _sparse_dtype(W_enc)
    values = G.reshape(-1)[row_slots].to(dtype)
    G_csr = _csr(crow, indices.reshape(-1)[row_slots], values, (B, W_enc.shape[1]))
    return _csr_mm(G_csr, W_enc.to(dtype).t())


def encode(x: Tensor, shift: Tensor, W_enc: Tensor, b_enc: Tensor, rules: Sequence[SelectionRule], *,
           chunk_rows: int | None = None) -> list[Selection]:
    """Every rule's Selection of pre = (x - shift) @ W_enc + b_enc (kernels/backend.py), computed in
    chunks of rows; `pre` differentiable in shift, W_enc, b_enc (and x)."""
    check_encode_args(x, shift, W_enc, b_enc, rules)
    return grouped_selections(SparseEncodeFunction.apply(x, shift, W_enc, b_enc, tuple(rules), chunk_rows))


# -- decode -------------------------------------------------------------------------------------


class SparseDecodeFunction(torch.autograd.Function):
    """(indices, values, W_dec, bias) -> recon [B, d] = sum_j values[:, j] * W_dec[indices[:, j]] + bias."""

    @staticmethod
    def forward(ctx, indices, values, W_dec, bias):
        recon = F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")  # [B, d]
        recon += bias
        ctx.save_for_backward(indices, values, W_dec)
        return recon

    @staticmethod
    def backward(ctx, g):
        indices, values, W_dec = ctx.saved_tensors
        _, need_values, need_W, need_bias = ctx.needs_input_grad
        grad_values = grad_W = grad_bias = None
        if need_values:
            grad_values = _sampled_rows_dot(indices, g, W_dec).to(values.dtype)  # [B, K]
        if need_W:
            layout = _layout_cache.get(indices, values != 0, W_dec.shape[0])
            grad_W = _latent_matmul(layout, values, g).to(W_dec.dtype)  # [m, d]
        if need_bias:
            grad_bias = g.sum(0)  # [d]
        return None, grad_values, grad_W, grad_bias


def decode(code: SparseCode, W_dec: Tensor, bias: Tensor) -> Tensor:
    """recon [B, d] = sum_j values[b, j] * W_dec[indices[b, j]] + bias; differentiable in values, W_dec, bias.

    code: indices [B, K] int64, values [B, K] (cast to W_dec's dtype); W_dec [m, d], bias [d].
    """
    indices, values = code
    if indices.ndim != 2 or indices.shape != values.shape or indices.dtype != torch.int64:
        raise ValueError(
            f"decode expects int64 indices and values of one shape [B, K]; got {indices.dtype} "
            f"{tuple(indices.shape)} and {tuple(values.shape)}"
        )
    if W_dec.ndim != 2 or tuple(bias.shape) != (W_dec.shape[1],):
        raise ValueError(
            f"decode expects W_dec [m, d] and bias [d]; got {tuple(W_dec.shape)} and {tuple(bias.shape)}"
        )
    return SparseDecodeFunction.apply(indices, values.to(W_dec.dtype), W_dec, bias.to(W_dec.dtype))


# -- decoder-norm constraint --------------------------------------------------------------------


def _math_dtype(t: Tensor) -> torch.dtype:
    """fp32 for fp32 and narrower (the references' precision), fp64 stays fp64."""
    return torch.promote_types(t.dtype, torch.float32)


@torch.no_grad()
def remove_parallel_grad_(W: Tensor, G: Tensor) -> Tensor:
    """In place: G_i -= <G_i, W_i> / ||W_i||^2 * W_i for each row (fp32 math or wider); a zero row of
    W keeps G_i. W, G: [m, d]. Returns G."""
    dtype = _math_dtype(G)
    W32, G32 = W.to(dtype), G.to(dtype)
    dot = torch.bmm(W32.unsqueeze(1), G32.unsqueeze(2)).view(-1)  # [m]: batched dots, no [m, d] temporary
    sq = torch.linalg.vector_norm(W32, dim=1).square_()  # [m]
    coef = torch.where(sq > 0, dot / sq.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(dot))
    if G.dtype == dtype:
        G.addcmul_(coef.unsqueeze(1), W32, value=-1.0)
    else:
        G.copy_(G32.addcmul_(coef.unsqueeze(1), W32, value=-1.0))
    return G


@torch.no_grad()
def normalize_rows_(W: Tensor, eps: float = 1e-12) -> Tensor:
    """In place: each row of W [m, d] at unit L2 norm (fp32 math or wider, a zero row stays zero)."""
    dtype = _math_dtype(W)
    norms = torch.linalg.vector_norm(W, dim=1, keepdim=True, dtype=dtype).clamp_min_(eps)  # [m, 1]
    if W.dtype == dtype:
        W.div_(norms)
    else:
        W.copy_(W.to(dtype).div_(norms))
    return W
