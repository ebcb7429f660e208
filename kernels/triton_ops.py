"""saetron's Triton backend: the four ops the dispatcher calls, re-exported from their per-op files.

    encode(x, shift, W_enc, b_enc, activation, k=None, capacity=None) -> SparseCode   triton_encode.py
    decode(indices, values, W_dec, bias) -> recon [B, d]                               triton_decode.py
    remove_parallel_grad_(W, G) -> G      (in place, row-wise, fp32 math)              triton_decoder_norm.py
    normalize_rows_(W) -> W               (in place)                                   triton_decoder_norm.py

Same signatures as saetron.kernels.torch_sparse. The kernels run on CUDA tensors, or on CPU tensors
only when TRITON_INTERPRET=1 was set before triton's first import (tests). Gradients: encode's
values -> shift, W_enc, b_enc (triton_encoder_bwd.py); decode -> values, W_dec, bias.
"""

from .triton_decode import decode
from .triton_decoder_norm import normalize_rows_, remove_parallel_grad_
from .triton_encode import encode

__all__ = ["encode", "decode", "remove_parallel_grad_", "normalize_rows_"]
