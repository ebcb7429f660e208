"""saetron's Triton backend: the four ops of the backend interface (kernels/backend.py), from their files.

    encode(x, shift, W_enc, b_enc, rules, *, chunk_rows=None) -> list[Selection]   triton_encode.py
    decode(code, W_dec, bias) -> recon [B, d]                                       triton_decode.py
    remove_parallel_grad_(W, G) -> G      (in place, row-wise, fp32 math)           triton_decoder_norm.py
    normalize_rows_(W) -> W               (in place)                                triton_decoder_norm.py

The kernels run on CUDA tensors, or on CPU tensors only when TRITON_INTERPRET=1 was set before
triton's first import (tests). Gradients: encode's pre -> shift, W_enc, b_enc (triton_encoder_bwd.py);
decode -> values, W_dec, bias.
"""

from torch import Tensor

from . import triton_decode
from .sparse_code import SparseCode
from .triton_decoder_norm import normalize_rows_, remove_parallel_grad_
from .triton_encode import encode


def decode(code: SparseCode, W_dec: Tensor, bias: Tensor) -> Tensor:
    """recon [B, d] = sum_j code.values[:, j] * W_dec[code.indices[:, j]] + bias (triton_decode.py)."""
    return triton_decode.decode(code.indices, code.values.to(W_dec.dtype), W_dec, bias.to(W_dec.dtype))


__all__ = ["encode", "decode", "remove_parallel_grad_", "normalize_rows_"]
