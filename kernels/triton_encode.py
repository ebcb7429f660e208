"""The Triton backend's encode: cuBLAS GEMM chunks, Triton selects, the Triton encoder backward.

Forward (kernels/backend.py `encode_rows`), per chunk of rows (ENCODE_CHUNK_BYTES of pre-activations):

    pre = addmm(b_enc, x - shift, W_enc)          # [rows, d_sae] in the compute dtype: cuBLAS
    per rule, on that chunk (triton_select.py):
        RowTopK    radix select per row (2 histogram passes for bf16/fp16, 4 for fp32) + emit
        Threshold  emit of pre > theta - margin into a capacity
        BatchTopK  radix select over the chunk; the chunks' candidates select once more at the end

Backward (EncodeFunction): the selected slots of every rule, concatenated along K, with
dpre = dL/dpre there (padding 0), go to the encoder backward of triton_encoder_bwd.py:

    db_enc[i]    = sum over slots of latent i of dpre
    dW_enc[:, i] = sum over slots of latent i of dpre (x[token] - shift)
    dshift       = -W_enc @ db_enc

x is data: it gets no gradient. Shapes: x [B, d], shift [d], W_enc [d, d_sae] row-major, b_enc
[d_sae]; one float dtype (fp32, bf16, fp16) for all. Reference: reference.encode. The speed of this
design on a GPU is unmeasured.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import triton_select
from .backend import check_encode_args, encode_rows, flat_selections, grouped_selections
from .selection import Selection, SelectionRule
from .triton_common import check_float
from .triton_encoder_bwd import encoder_bwd


class EncodeFunction(torch.autograd.Function):
    """(x, shift, W_enc, b_enc, rules) -> per rule (indices, pre, valid); pre differentiable w.r.t.
    shift, W_enc, b_enc."""

    @staticmethod
    def forward(ctx, x, shift, W_enc, b_enc, rules, chunk_rows):
        selections = encode_rows(x, shift, W_enc, b_enc, rules, triton_select, chunk_rows)
        outputs = flat_selections(selections)
        ctx.mark_non_differentiable(*(t for sel in selections for t in (sel.indices, sel.valid)))
        ctx.save_for_backward(x, shift, W_enc, *outputs)
        ctx.b_dtype = b_enc.dtype
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        x, shift, W_enc, *outputs = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[1:4])
        if not any(need):
            return None, None, None, None, None, None
        indices, dpre = [], []
        for (idx, _, valid), grad in zip(grouped_selections(outputs), grads[1::3]):
            if grad is None:
                continue
            indices.append(idx)
            dpre.append(torch.where(valid, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)))
        if not indices:  # no rule's pre-activations reached the loss
            idx, pre, _ = grouped_selections(outputs)[0]
            indices, dpre = [idx], [torch.zeros_like(pre)]
        dshift, dW_enc, db_enc = encoder_bwd(x, shift, W_enc, torch.cat(indices, 1).contiguous(),
                                             torch.cat(dpre, 1).contiguous(), need)
        if db_enc is not None:
            db_enc = db_enc.to(ctx.b_dtype)
        return None, dshift, dW_enc, db_enc, None, None


def encode(x: Tensor, shift: Tensor, W_enc: Tensor, b_enc: Tensor, rules: Sequence[SelectionRule], *,
           chunk_rows: int | None = None) -> list[Selection]:
    """Every rule's Selection of pre = (x - shift) @ W_enc + b_enc (kernels/backend.py), in chunks of
    rows; `pre` carries gradients to shift, W_enc, b_enc (x is data: no gradient)."""
    B, d, d_sae = check_encode_args(x, shift, W_enc, b_enc, rules)
    check_float("x", x, (B, d))
    check_float("W_enc", W_enc, (d, d_sae), x.dtype)
    triton_select.key_bits(x.dtype)  # bf16, fp16 or fp32: a ValueError otherwise
    outputs = EncodeFunction.apply(x.detach(), shift, W_enc, b_enc, tuple(rules), chunk_rows)
    return grouped_selections(outputs)
