"""torch backend: the SAE's sparse encode, sparse decode and decoder-norm ops in plain torch (CPU, GPU).

Same interface as the Triton backend (`saetron.kernels.triton_ops`), same math as the dense references
in `reference.py`. B tokens, d = d_in, m = d_sae, K = width of the padded `SparseCode` (k for topk).

    encode:  pre = (x - shift) @ W_enc + b_enc                      # [B, m]: the one dense GEMM
             topk: (indices, values) = topk_k(pre), values = ReLU(values)    # [B, k]
             relu: each row's active latents, zero-padded to K = the batch's largest row count
    decode:  recon_b = sum_j values[b, j] * W_dec[indices[b, j]] + bias      # [B, d]

Backward from the sparse gradients only: no [B, m] tensor is built after the encoder GEMM.
    decode:  dvalues[b, j] = <g_b, W_dec[i_bj]>     a sampled dense-dense product (SDDMM)   # [B, K]
             dW_dec = F^T @ g                       F^T as a latent-major CSR [m, B]        # [m, d]
             dbias  = sum_b g_b                                                             # [d]
    encode:  G      = dvalues * [values > 0]        the pre-activation gradient, active slots only
             dW_enc = (G^T as CSR [m, B] @ (x - shift))^T                                   # [d, m]
             db_enc = scatter-add of G over the latents                                     # [m]
             dshift = -W_enc @ db_enc               reduced over the batch first: one mat-vec
             dx     = G @ W_enc^T                   row-major CSR, only when x needs a gradient

Measured on the project's 2-core CPU at d=576, m=4608, B=4096, k=64 (fp32): encoder GEMM ~100 ms,
topk ~70 ms, embedding_bag decode ~12 ms, SDDMM ~16 ms, each CSR weight-gradient matmul ~15 ms,
the latent-major sort ~8 ms; the dense GEMMs these replace take 100-250 ms each.

Dtypes: the math runs in the parameters' dtype. torch's CPU sparse kernels (MKL CSR matmul,
sampled_addmm) exist for fp32/fp64 only, so bf16/fp16 operands are upcast to fp32 there and the
gradients cast back. CSR indices are int64: MKL's int32 path measured 3x slower here.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import ACTIVATIONS
from .sparse_code import CapacityExceeded, SparseCode

# torch's CPU CSR matmul and sampled_addmm have no bf16/fp16 kernels (torch 2.13: "not implemented").
_CPU_SPARSE_DTYPES = (torch.float32, torch.float64)
# cuSPARSE expects each CSR row's column ids in ascending order; torch's CPU kernels do not (checked
# against a gather-and-dot on unsorted rows with repeated ids), so the sort is skipped there.
_SORTED_COLUMNS_DEVICES = ("cuda",)
# Block width of the ReLU extraction's screening pass (_positive_positions); 32 measured best of 8/16/32.
RELU_BLOCK = 32


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
    if t.device.type == "cpu" and t.dtype not in _CPU_SPARSE_DTYPES:
        return torch.float32
    return t.dtype


class _LatentLayoutCache:
    """The last latent-major layout, keyed by its code's storage and version counters.

    A training step needs the layout twice, in the decode backward (dW_dec) and then in the encode
    backward (dW_enc), for the same code: the second use skips the sort (~8 ms of a ~250 ms step).
    The entry holds references to the code's tensors, so their storage cannot be reused for another
    code while it is cached, and `_version` catches in-place edits.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._refs: tuple[Tensor, Tensor] | None = None
        self._layout: tuple[Tensor, Tensor, Tensor] | None = None

    @staticmethod
    def _key_of(indices: Tensor, values: Tensor) -> tuple:
        return (indices.data_ptr(), values.data_ptr(), tuple(indices.shape), indices.stride(),
                values.stride(), indices._version, values._version, values.device)

    def get(self, indices: Tensor, values: Tensor, d_sae: int) -> tuple[Tensor, Tensor, Tensor]:
        key = self._key_of(indices, values) + (d_sae,)
        if key == self._key:
            layout = self._layout
            self._key = self._refs = self._layout = None  # each code is used at most twice
            return layout
        layout = _latent_major(indices, values != 0, d_sae)
        self._key, self._refs, self._layout = key, (indices, values), layout
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
    """out[b, j] = <g[b], W[indices[b, j]]> for indices [B, K], g [B, d], W [m, d] -> [B, K].

    torch.sparse.sampled_addmm computes (g @ W^T) only at the CSR pattern of `indices`, without the
    [B, K, d] gather (604 MB at B=4096, K=64, d=576) that a gather-and-bmm needs.
    """
    B, K = indices.shape
    dtype = _sparse_dtype(g)
    order = None
    if indices.device.type in _SORTED_COLUMNS_DEVICES:
        indices, order = torch.sort(indices, dim=1)
    crow = torch.arange(0, B * K + 1, K, dtype=torch.int64, device=indices.device)
    zeros = torch.zeros(B * K, dtype=dtype, device=g.device)
    pattern = _csr(crow, indices.reshape(-1), zeros, (B, W.shape[0]))
    out = torch.sparse.sampled_addmm(pattern, g.to(dtype), W.to(dtype).t(), beta=0.0).values().view(B, K)
    if order is not None:
        out = torch.empty_like(out).scatter_(1, order, out)
    return out


# -- encode -------------------------------------------------------------------------------------


def _positive_positions(pre: Tensor) -> Tensor:
    """Row-major flat positions b * m + i of the entries > 0 of pre [B, m], ascending: [nnz].

    Blocks of RELU_BLOCK entries are screened by their max first and only the blocks holding a
    positive entry are searched: at L0 ~64 of 4608 that is ~60% of the data, and the search costs
    29 ms instead of 41 ms for a plain `(pre > 0).nonzero()` at B=4096 (2 threads).
    """
    if pre.shape[1] % RELU_BLOCK:
        return (pre > 0).view(-1).nonzero().squeeze(1)
    blocks = pre.view(-1, RELU_BLOCK)  # [B * m / RELU_BLOCK, RELU_BLOCK]
    hot = (blocks.amax(1) > 0).nonzero().squeeze(1)  # blocks holding a positive entry
    found = (blocks[hot] > 0).view(-1).nonzero().squeeze(1)  # positions inside those blocks
    return hot[found // RELU_BLOCK] * RELU_BLOCK + found % RELU_BLOCK


def _relu_code(pre: Tensor, capacity: int | None) -> tuple[Tensor, Tensor]:
    """Active latents of ReLU(pre) [B, m], padded per row to K slots: (indices, values) [B, K].

    K is `capacity` when given (CapacityExceeded if a row has more), else the largest row count
    (at least 1). Padding slots hold id 0 and value 0. Rows keep their latents in ascending id order.
    """
    B, m = pre.shape
    flat = _positive_positions(pre)  # [nnz] row-major positions b * m + i
    rows = flat // m
    counts = torch.bincount(rows, minlength=B)  # [B]
    max_active = int(counts.max()) if B else 0
    if capacity is not None and max_active > capacity:
        raise CapacityExceeded(max_active, capacity)
    K = capacity if capacity is not None else max(1, max_active)
    starts = torch.cumsum(counts, 0) - counts  # [B]
    slots = rows * K + (torch.arange(flat.numel(), device=pre.device) - starts[rows])  # [nnz]
    indices = torch.zeros(B * K, dtype=torch.int64, device=pre.device)
    values = torch.zeros(B * K, dtype=pre.dtype, device=pre.device)
    indices[slots] = flat - rows * m
    values[slots] = pre.view(-1)[flat]
    return indices.view(B, K), values.view(B, K)


class SparseEncodeFunction(torch.autograd.Function):
    """(x, shift, W_enc, b_enc) -> (indices, values) [B, K]: the active latents of the encoder."""

    @staticmethod
    def forward(ctx, x, shift, W_enc, b_enc, activation, k, capacity):
        x_c = x - shift  # [B, d]
        pre = x_c @ W_enc  # [B, m]
        pre += b_enc  # in place, and bit-identical to encode_ref's `@ W_enc + b_enc` (addmm is not)
        if activation == "topk":
            values, indices = torch.topk(pre, k, dim=-1, sorted=False)  # [B, k]
            values = values.relu_()
        else:
            indices, values = _relu_code(pre, capacity)  # [B, K]
        del pre
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(x_c, W_enc, indices, values)
        return indices, values

    @staticmethod
    def backward(ctx, _grad_indices, grad_values):
        x_c, W_enc, indices, values = ctx.saved_tensors
        need_x, need_shift, need_W, need_b = ctx.needs_input_grad[:4]
        active = values > 0  # [B, K]: ReLU's gradient mask; padding and zeroed topk picks are 0
        G = torch.where(active, grad_values, torch.zeros((), dtype=grad_values.dtype, device=values.device))
        grad_x = grad_shift = grad_W = grad_b = None
        if need_W:
            # values > 0 and values != 0 are the same slots (ReLU'd values): the decode's layout serves
            layout = _layout_cache.get(indices, values, W_enc.shape[1])
            grad_W = _latent_matmul(layout, G, x_c)  # [m, d]
            grad_W = grad_W.t().contiguous().to(W_enc.dtype)  # [d, m]: the parameter's layout (7 ms)
        if need_b or need_shift:
            acc = torch.float64 if G.dtype == torch.float64 else torch.float32  # accumulate in fp32
            db = torch.zeros(W_enc.shape[1], dtype=acc, device=G.device)
            db.index_add_(0, indices.reshape(-1), G.reshape(-1).to(db.dtype))  # [m]
            if need_b:
                grad_b = db.to(W_enc.dtype)
            if need_shift:
                grad_shift = -(W_enc.to(db.dtype) @ db).to(W_enc.dtype)  # [d]: one mat-vec
        if need_x:
            B, K = indices.shape
            row_slots = active.reshape(-1).nonzero().squeeze(1)  # row-major: already CSR order
            crow = torch.zeros(B + 1, dtype=torch.int64, device=G.device)
            torch.cumsum(active.sum(1), 0, out=crow[1:])
            dtype = _sparse_dtype(W_enc)
            G_csr = _csr(crow, indices.reshape(-1)[row_slots], G.reshape(-1)[row_slots].to(dtype),
                         (B, W_enc.shape[1]))
            grad_x = _csr_mm(G_csr, W_enc.to(dtype).t()).to(x_c.dtype)  # [B, d]
        return grad_x, grad_shift, grad_W, grad_b, None, None, None


def encode(
    x: Tensor,  # [B, d]
    shift: Tensor,  # [d]
    W_enc: Tensor,  # [d, m]
    b_enc: Tensor,  # [m]
    activation: str,
    k: int | None = None,
    capacity: int | None = None,
) -> SparseCode:
    """SparseCode of act((x - shift) @ W_enc + b_enc); differentiable in x, shift, W_enc, b_enc.

    topk: K = k slots per row (the k largest pre-activations, then ReLU; `capacity` is unused).
    relu: K = `capacity` if given (CapacityExceeded when a row has more active latents), else the
    largest active count of the batch; padding slots hold value 0.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; allowed: {ACTIVATIONS}")
    if x.ndim != 2 or W_enc.ndim != 2 or x.shape[1] != W_enc.shape[0]:
        raise ValueError(
            f"encode expects x [B, d] and W_enc [d, m]; got {tuple(x.shape)} and {tuple(W_enc.shape)}"
        )
    d, m = W_enc.shape
    if tuple(shift.shape) != (d,) or tuple(b_enc.shape) != (m,):
        raise ValueError(
            f"encode expects shift [{d}] and b_enc [{m}]; got {tuple(shift.shape)}, {tuple(b_enc.shape)}"
        )
    if activation == "topk" and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= m):
        raise ValueError(f"activation='topk' needs k, an int in [1, d_sae={m}]; got k={k!r}")
    if capacity is not None and capacity < 1:
        raise ValueError(f"capacity must be a positive int or None; got {capacity!r}")
    indices, values = SparseEncodeFunction.apply(x, shift, W_enc, b_enc, activation, k, capacity)
    return SparseCode(indices=indices, values=values)


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
            layout = _layout_cache.get(indices, values, W_dec.shape[0])
            grad_W = _latent_matmul(layout, values, g).to(W_dec.dtype)  # [m, d]
        if need_bias:
            grad_bias = g.sum(0)  # [d]
        return None, grad_values, grad_W, grad_bias


def decode(indices: Tensor, values: Tensor, W_dec: Tensor, bias: Tensor) -> Tensor:
    """recon [B, d] = sum_j values[b, j] * W_dec[indices[b, j]] + bias; differentiable in values, W_dec, bias.

    indices [B, K] int64, values [B, K] (cast to W_dec's dtype), W_dec [m, d], bias [d].
    """
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
