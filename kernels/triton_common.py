"""Shared launch plumbing of saetron's Triton kernels: the interpreter check, input checks, latent CSR.

Triton decides at import and decoration time whether `@triton.jit` (its own `tl.sum`, `tl.topk`...
included) builds compiled `JITFunction`s or `InterpretedFunction`s: it reads TRITON_INTERPRET then.
So CPU tensors (tests only) need TRITON_INTERPRET=1 set before triton is first imported, and
compiled use (CUDA, the AOT audit) needs it unset. `launch` checks which world it is in and says so.

Block sizes are fixed per kernel (no autotuning): they cannot be measured on this project's CPU
machines, and the AOT audit (saetron.kernels.aot_audit) must compile exactly what runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """True when triton was imported under TRITON_INTERPRET=1 (its language is the interpreted one)."""
    return isinstance(tl.standard.sum, InterpretedFunction)


def launch(kernel, grid: Sequence[int], device: torch.device, *args, num_warps: int = 4,
           num_stages: int = 2, **constexprs) -> None:
    """Run `kernel[grid](*args, **constexprs)`: compiled on CUDA, interpreted on CPU (tests)."""
    grid = tuple(int(g) for g in grid)
    if any(g == 0 for g in grid):
        return
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
        return
    raise RuntimeError(
        f"saetron's Triton kernels run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was "
        f"set before triton was first imported (tests only); got tensors on {device} and an "
        f"{'interpreted' if interpreting() else 'compiled'} triton. Use backend='torch' on CPU."
    )


def dot_dtypes(dtype: torch.dtype, device: torch.device) -> tuple[object, object, str]:
    """(input tl dtype, tl.dot operand dtype, tl.dot input_precision) for tensors of `dtype`.

    bf16/fp16 operands feed the tensor cores as they are on CUDA; the interpreter computes bf16
    wrongly, so there they are upcast to fp32 (exact: a product of two bf16 values fits fp32).
    fp32 follows torch: tf32 only when torch.backends.cuda.matmul.allow_tf32 is on.
    """
    tl_dtype = {torch.float32: triton.language.float32, torch.bfloat16: triton.language.bfloat16,
                torch.float16: triton.language.float16}[dtype]
    if dtype == torch.float32:
        precision = "tf32" if (device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32) else "ieee"
        return tl_dtype, tl_dtype, precision
    operand = triton.language.float32 if device.type == "cpu" else tl_dtype
    return tl_dtype, operand, "ieee"


def check_float(name: str, t: Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> None:
    """Raise ValueError unless t is a floating tensor of `shape` (and `dtype`) with unit last stride."""
    if not isinstance(t, Tensor) or t.dtype not in FLOAT_DTYPES:
        got = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a float32/bfloat16/float16 tensor; got {got}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}; got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype} (the kernels take one float dtype); got {t.dtype}")
    if t.ndim and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected a unit stride on the last dim; got strides {t.stride()}")


def check_indices(indices: Tensor, values: Tensor, d_sae: int) -> None:
    """indices [B, K] int64 on values' device and with values' shape."""
    if indices.dtype != torch.int64 or indices.ndim != 2:
        raise ValueError(
            f"indices: expected a 2-D int64 tensor [B, K]; got {indices.dtype} {tuple(indices.shape)}"
        )
    if values.shape != indices.shape:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must match")
    if indices.device != values.device:
        raise ValueError(f"indices on {indices.device} but values on {values.device}")
    if indices.numel() and d_sae <= 0:
        raise ValueError(f"d_sae must be positive; got {d_sae}")


def latent_csr(indices: Tensor, values: Tensor, d_sae: int) -> tuple[Tensor, Tensor]:
    """Group the slots of a SparseCode by latent: (perm [B*K] int64, offsets [d_sae + 1] int64).

    perm[offsets[i]:offsets[i+1]] are the flat slot numbers (b*K + j) whose latent is i. Slots whose
    value is 0 (padding, inactive top-k picks) contribute nothing to any weight gradient and are
    left out; without this, a ReLU code's padding (all at latent 0) would serialize on one program.
    A stable sort keeps each latent's slots in token order, so the sums are deterministic.
    offsets[i] = the number of kept keys below i, by a binary search of the sorted keys: no bincount,
    whose CUDA version reads the largest key back to the host (a synchronization in the backward).
    Cost at B*K = 524288 slots: a 32-bit-key radix sort (half the passes of int64 keys) and a
    searchsorted of d_sae + 1 queries, ~0.1-0.2 ms on an H200 (estimated, unmeasured); built once for
    dW_dec and once for dW_enc each step.
    """
    sentinel = torch.full_like(indices, d_sae)
    keys = torch.where(values != 0, indices, sentinel).reshape(-1).to(torch.int32)  # [B*K]
    sorted_keys, perm = torch.sort(keys, stable=True)
    bounds = torch.arange(d_sae + 1, dtype=torch.int32, device=indices.device)  # [d_sae + 1]
    offsets = torch.searchsorted(sorted_keys, bounds)  # [d_sae + 1] int64: first position of key >= i
    return perm, offsets
