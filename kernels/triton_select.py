"""Triton selects on a pre-activation chunk: radix top-k (per row and over a whole batch), threshold.

The selects read a chunk pre [R, N] (R tokens, N = d_sae, row-major, written by cuBLAS) and never
sort it. Every float maps to an order-preserving unsigned key u (16 bits for bf16/fp16, 32 for fp32):

    u = bits ^ 0xFFFF...   if the sign bit is set      (negative: flip every bit)
    u = bits | 0x8000...   otherwise                   (non-negative: set the sign bit)

so u1 > u2 (unsigned) iff x1 > x2 (with -0 < +0). Top-count by radix select, 8 bits per pass, most
significant digit first (2 passes for 16-bit keys, 4 for 32-bit):

    _radix_hist_kernel     histogram [256] of the digit at SHIFT over the entries whose higher digits
                           equal the prefix found so far (one program per row, int32 counts)
    _radix_resolve_kernel  remaining count r, histogram h: the digit D with sum_{j>D} h < r <= sum_{j>=D} h;
                           prefix = prefix << 8 | D, r -= sum_{j>D} h
After the last pass, prefix is the key T of the count-th largest entry and r the number of entries
equal to T to take (`quota`). The emit pass walks each row in column order and keeps u > T, plus the
first `quota` entries with u == T, so exactly the count are chosen (ties: lowest column first).
A row with fewer candidates than the count gets them all (T = 0, quota > ties).

Per-row top-k (RowTopK) keeps one histogram and state per row. The batch's top-count (BatchTopK)
shares one histogram and state over all rows (rows add into it atomically); then `_select_count_kernel`
gives each row its entries above T and its ties, the quotas go to rows in order (exclusive cumsum,
so ties are taken lowest flat position first), and the emit writes each row's entries at its CSR
offset as flat positions. The threshold select (Threshold) is the emit pass alone with
u replaced by pre > theta[col] - margin (fp32), into a capacity per row.

Entries read per chunk: 2 (16-bit) or 4 (32-bit) histogram passes + 1 emit (+1 count for the batch).
At B=8192, d_sae=57344 in bf16 a pass reads 0.94 GB (~0.22 ms at 4.3 TB/s), so RowTopK's 3 passes
should cost ~0.7 ms against the GEMM's 8.6 ms; unmeasured on a GPU.
Shapes: pre [R, N] contiguous in bf16/fp16/fp32; mask [N] bool; theta [N] or [1] fp32.
Outputs: indices int64 (latent ids, or flat positions row * N + col), values in pre's dtype, counts int32.
Reference: saetron.kernels.reference (select_mask_ref).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .selection import RowTopK, Selection, Threshold, threshold_values
from .sparse_code import CapacityExceeded
from .triton_common import launch

# One program walks one row in BLOCK_N-column tiles: 1024 bf16 = 2 KiB per load, 8 values per thread
# at 4 warps. The interpreter runs small test rows: 128 keeps several tiles per row there (the
# carried counts across tiles are what the tests must reach).
BLOCK_N = 1024
INTERPRETER_BLOCK_N = 128
NUM_WARPS = 4
BINS = 256  # 8-bit digits
# Slots per row of the first emit of a capacity-less Threshold: 4x a trained L0 of 64; a wider chunk
# re-emits once at its widest row (no second GEMM: the chunk is still there).
THRESHOLD_FIRST_CAPACITY = 256
# Columns of the 2-D view the batch's final pick reads its 1-D candidate array through.
FLAT_VIEW_COLUMNS = 8 * BLOCK_N


@triton.jit
def _key(v, KEY_BITS: tl.constexpr):
    """The order-preserving unsigned key of float values v, in the low KEY_BITS bits of an int32."""
    if KEY_BITS == 16:
        bits = v.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return tl.where((bits & 0x8000) != 0, bits ^ 0xFFFF, bits | 0x8000)
    else:
        bits = v.to(tl.int32, bitcast=True)
        return tl.where(bits < 0, ~bits, bits ^ -2147483648)


@triton.jit
def _signed(u, KEY_BITS: tl.constexpr):
    """Keys in signed int32 order (unsigned 32-bit keys compare wrongly as int32)."""
    if KEY_BITS == 32:
        return u ^ -2147483648
    else:
        return u


@triton.jit
def _included(row, cols, N, n_total, mask_ptr, HAS_MASK: tl.constexpr):
    """Which columns of a tile are candidates: inside the row, the flat range, and the mask."""
    inc = (cols < N) & (row * N + cols < n_total)
    if HAS_MASK:
        inc = inc & (tl.load(mask_ptr + cols, mask=cols < N, other=0) != 0)
    return inc


@triton.jit
def _radix_hist_kernel(
    pre_ptr,  # [R, N]
    mask_ptr,  # [N] bool (read when HAS_MASK)
    prefix_ptr,  # [R or 1] int32: the higher digits found so far
    hist_ptr,  # [R or 1, 256] int32, zero-filled; accumulated atomically
    stride_pre,
    state_stride,  # 1: a state per row; 0: one state shared by all rows
    N,
    n_total,  # entries of the flat view that exist (R * N for a whole chunk)
    SHIFT: tl.constexpr,
    KEY_BITS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    bins = tl.arange(0, 256)
    prefix = tl.load(prefix_ptr + row * state_stride)
    counts = tl.zeros((256,), dtype=tl.int32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        inc = _included(row, cols, N, n_total, mask_ptr, HAS_MASK)
        u = _key(tl.load(pre_ptr + row * stride_pre + cols, mask=inc, other=0.0), KEY_BITS)
        if SHIFT + 8 < KEY_BITS:  # only entries whose higher digits are the prefix
            inc = inc & (((u >> (SHIFT + 8)) & ((1 << (KEY_BITS - SHIFT - 8)) - 1)) == prefix)
        digit = tl.where(inc, (u >> SHIFT) & 255, 0)
        # Excluded lanes were counted in bin 0: take them out (no reliance on histogram's mask argument).
        counts += tl.histogram(digit, 256) - tl.where(bins == 0, tl.sum(tl.where(inc, 0, 1)), 0)
    tl.atomic_add(hist_ptr + row * state_stride * 256 + bins, counts, sem="relaxed")


@triton.jit
def _radix_resolve_kernel(
    hist_ptr,  # [S, 256] int32
    prefix_ptr,  # [S] int32, updated
    remaining_ptr,  # [S] int32, updated
):
    s = tl.program_id(0).to(tl.int64)
    bins = tl.arange(0, 256)
    h = tl.load(hist_ptr + s * 256 + bins)
    remaining = tl.load(remaining_ptr + s)
    at_or_above = tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h  # [256]: sum_{j >= bin} h[j]
    digit = tl.max(tl.where(at_or_above >= remaining, bins, 0), axis=0)
    above = tl.sum(tl.where(bins > digit, h, 0), axis=0)
    tl.store(prefix_ptr + s, (tl.load(prefix_ptr + s) << 8) | digit)
    tl.store(remaining_ptr + s, remaining - above)


@triton.jit
def _select_count_kernel(
    pre_ptr,  # [R, N]
    key_ptr,  # [1] int32: the shared threshold key T
    above_ptr,  # [R] int32: entries with key > T
    ties_ptr,  # [R] int32: entries with key == T
    stride_pre,
    N,
    n_total,
    KEY_BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    T = tl.load(key_ptr)
    above = tl.zeros((BLOCK_N,), dtype=tl.int32)
    ties = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        inc = _included(row, cols, N, n_total, pre_ptr, False)
        u = _key(tl.load(pre_ptr + row * stride_pre + cols, mask=inc, other=0.0), KEY_BITS)
        above += (inc & (_signed(u, KEY_BITS) > _signed(T, KEY_BITS))).to(tl.int32)
        ties += (inc & (u == T)).to(tl.int32)
    tl.store(above_ptr + row, tl.sum(above, axis=0))
    tl.store(ties_ptr + row, tl.sum(ties, axis=0))


@triton.jit
def _select_emit_kernel(
    pre_ptr,  # [R, N]
    mask_ptr,  # [N] bool (HAS_MASK)
    theta_ptr,  # [N] or [1] fp32: theta - margin (BY_VALUE)
    key_ptr,  # [R or 1] int32: threshold key T (by key)
    quota_ptr,  # [R] int32: ties to take (by key)
    starts_ptr,  # [R] int64: each row's first output slot (HAS_STARTS)
    indices_ptr,  # out: int64
    values_ptr,  # out: pre's dtype
    counts_ptr,  # out: [R] int32, entries selected (also those past `limit`)
    stride_pre,
    key_stride,  # 1: a key per row; 0: one key for all rows
    theta_stride,
    N,
    n_total,
    limit,  # slots per row: stores past it are dropped, counts still count them
    out_row_stride,  # without HAS_STARTS: row r writes from r * out_row_stride
    index_row_stride,  # the index written is col + row * index_row_stride (N: flat positions)
    BY_VALUE: tl.constexpr,
    KEY_BITS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_STARTS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if HAS_STARTS:
        base = tl.load(starts_ptr + row)
    else:
        base = row * out_row_stride
    if not BY_VALUE:
        T = tl.load(key_ptr + row * key_stride)
        quota = tl.load(quota_ptr + row)
    taken = 0
    ties_seen = 0
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        inc = _included(row, cols, N, n_total, mask_ptr, HAS_MASK)
        v = tl.load(pre_ptr + row * stride_pre + cols, mask=inc, other=0.0)
        if BY_VALUE:
            limit_v = tl.load(theta_ptr + cols * theta_stride, mask=cols < N, other=0.0)
            take = inc & (v.to(tl.float32) > limit_v)
        else:
            u = _key(v, KEY_BITS)
            tie = (inc & (u == T)).to(tl.int32)
            tie_rank = ties_seen + tl.cumsum(tie, axis=0) - tie  # ties before this one in the row
            take = (inc & (_signed(u, KEY_BITS) > _signed(T, KEY_BITS))) | ((tie != 0) & (tie_rank < quota))
            ties_seen += tl.sum(tie, axis=0)
        take_i = take.to(tl.int32)
        slot = taken + tl.cumsum(take_i, axis=0) - take_i
        keep = take & (slot < limit)
        tl.store(indices_ptr + base + slot, cols.to(tl.int64) + row * index_row_stride, mask=keep)
        tl.store(values_ptr + base + slot, v, mask=keep)
        taken += tl.sum(take_i, axis=0)
    tl.store(counts_ptr + row, taken)


# -- launchers ----------------------------------------------------------------------------------


def _block_n(device: torch.device) -> int:
    return INTERPRETER_BLOCK_N if device.type == "cpu" else BLOCK_N


def key_bits(dtype: torch.dtype) -> int:
    """16 for bf16/fp16 keys, 32 for fp32."""
    if dtype in (torch.bfloat16, torch.float16):
        return 16
    if dtype == torch.float32:
        return 32
    raise ValueError(f"the Triton selects take bf16, fp16 or fp32 pre-activations; got {dtype}")


def radix_threshold(pre: Tensor, count: int, shared: bool, n_total: int,
                    mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(key T, quota) of the count-th largest entry: per row ([R] int32 each), or over all rows ([1]).

    pre [R, N] contiguous; entries past n_total in the flat view and columns outside `mask` are not
    candidates.
    """
    R, N = pre.shape
    bits = key_bits(pre.dtype)
    states = 1 if shared else R
    prefix = torch.zeros(states, dtype=torch.int32, device=pre.device)
    remaining = torch.full((states,), int(count), dtype=torch.int32, device=pre.device)
    hist = torch.zeros(bits // 8, states, BINS, dtype=torch.int32, device=pre.device)
    for p in range(bits // 8):
        launch(_radix_hist_kernel, (R,), pre.device, pre, mask if mask is not None else pre, prefix, hist[p],
               pre.stride(0), 0 if shared else 1, N, n_total,
               SHIFT=bits - 8 * (p + 1), KEY_BITS=bits, HAS_MASK=mask is not None,
               BLOCK_N=_block_n(pre.device), num_warps=NUM_WARPS)
        launch(_radix_resolve_kernel, (states,), pre.device, hist[p], prefix, remaining, num_warps=NUM_WARPS)
    return prefix, remaining


def _emit(pre: Tensor, out_width: int, n_total: int, *, key: Tensor | None = None,
          quota: Tensor | None = None, key_stride: int = 1, theta: Tensor | None = None,
          mask: Tensor | None = None, starts: Tensor | None = None, total: int | None = None,
          flat: bool = False, limit: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The emit pass: (indices, values, counts [R]); outputs [R, out_width], or [total] with `starts`."""
    R, N = pre.shape
    shape = (total,) if starts is not None else (R, out_width)
    indices = torch.zeros(shape, dtype=torch.int64, device=pre.device)
    values = torch.zeros(shape, dtype=pre.dtype, device=pre.device)
    counts = torch.empty(R, dtype=torch.int32, device=pre.device)
    by_value = theta is not None
    dummy = counts
    launch(_select_emit_kernel, (R,), pre.device, pre, mask if mask is not None else dummy,
           theta if by_value else dummy, key if key is not None else dummy,
           quota if quota is not None else dummy, starts if starts is not None else dummy,
           indices, values, counts, pre.stride(0), key_stride,
           (1 if theta.numel() > 1 else 0) if by_value else 0, N, n_total,
           limit if limit is not None else out_width, out_width, N if flat else 0,
           BY_VALUE=by_value, KEY_BITS=key_bits(pre.dtype), HAS_MASK=mask is not None,
           HAS_STARTS=starts is not None, BLOCK_N=_block_n(pre.device), num_warps=NUM_WARPS)
    return indices, values, counts


# -- the ChunkSelector of kernels/backend.py --------------------------------------------------------


def row_topk(pre: Tensor, rule: RowTopK) -> Selection:
    """[R, k]: each row's k largest entries (among the mask's columns); ties lowest column first."""
    R, N = pre.shape
    key, quota = radix_threshold(pre, rule.k, False, R * N, rule.mask)
    indices, values, counts = _emit(pre, rule.k, R * N, key=key, quota=quota, mask=rule.mask)
    valid = torch.arange(rule.k, device=pre.device) < counts[:, None]
    return Selection(indices, values, valid)


def threshold(pre: Tensor, rule: Threshold) -> Selection:
    """[R, K]: every entry > theta - margin, in column order; K = capacity, else the widest row."""
    R, N = pre.shape
    limit = threshold_values(rule, N, pre.device)  # [N] or [1] fp32
    width = rule.capacity if rule.capacity is not None else min(N, THRESHOLD_FIRST_CAPACITY)
    indices, values, counts = _emit(pre, width, R * N, theta=limit)
    widest = int(counts.max()) if R else 0
    if widest > width:
        if rule.capacity is not None:
            raise CapacityExceeded(widest, rule.capacity)
        width = widest  # the counts are exact: one more emit fits every row
        indices, values, counts = _emit(pre, width, R * N, theta=limit)
    if rule.capacity is None:  # K = the widest row: no all-padding columns
        keep = max(1, widest)
        indices, values = indices[:, :keep].contiguous(), values[:, :keep].contiguous()
    valid = torch.arange(indices.shape[1], device=pre.device) < counts[:, None]
    return Selection(indices, values, valid)


def top_positions(values: Tensor, count: int) -> Tensor:
    """int64 [count]: flat row-major positions of the count largest entries of 2-D `values`, ascending;
    ties lowest position first."""
    R, N = values.shape
    n_total = R * N
    if R == 1 and N > FLAT_VIEW_COLUMNS:  # one long row (the batch's candidates): rows for the programs
        rows = triton.cdiv(N, FLAT_VIEW_COLUMNS)
        view = torch.zeros(rows * FLAT_VIEW_COLUMNS, dtype=values.dtype, device=values.device)
        view[:N] = values.view(-1)
        values = view.view(rows, FLAT_VIEW_COLUMNS)
    if count < 1 or count > n_total:
        raise ValueError(f"top_positions: count must be in [1, {n_total}]; got {count}")
    key, need = radix_threshold(values, count, True, n_total)  # [1], [1]
    R, N = values.shape
    above = torch.empty(R, dtype=torch.int32, device=values.device)
    ties = torch.empty(R, dtype=torch.int32, device=values.device)
    launch(_select_count_kernel, (R,), values.device, values, key, above, ties, values.stride(0), N, n_total,
           KEY_BITS=key_bits(values.dtype), BLOCK_N=_block_n(values.device), num_warps=NUM_WARPS)
    ties64 = ties.long()
    quota = (need.long() - (torch.cumsum(ties64, 0) - ties64)).clamp_(min=0).minimum(ties64)  # [R]
    widths = above.long() + quota  # [R], sum = count
    starts = torch.cumsum(widths, 0) - widths
    positions, _, _ = _emit(values, N, n_total, key=key, quota=quota.int(), key_stride=0, starts=starts,
                            total=count, flat=True, limit=N)
    return positions
