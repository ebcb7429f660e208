"""SparseAutoencoder.forward on the sparse backends (torch, triton): fused centering, SparseCode features.

Same outputs and loss definitions as the dense reference forward in `model.py`, computed from the
active latents only (B tokens, K = the code's width):

    expected_average_only_in   encode(x, shift = activation_mean + b_dec * apply)   (centering fused)
                               recon = decode(code, bias = b_dec + activation_mean) (input units)
                               mse   = mean (recon - x)^2, equal to the reference's
                                       mean (recon_n - x_n)^2 since both differ by activation_mean
    layer_norm                 x_n = layer_norm(x) in torch (per-token statistics), then
                               encode(x_n, shift = b_dec * apply), recon_n = decode(code, bias = b_dec)
    none                       encode(x, shift = b_dec * apply), recon = decode(code, bias = b_dec)

    l1 = l1_coeff * mean_b sum_j values[b, j] * ||W_dec[indices[b, j]]||     (padding holds value 0)
    l0 = mean_b (number of values > 0 in row b)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from saetron.kernels.dispatch import DensityGate, backend_ops, log_once
from saetron.kernels.sparse_code import CapacityExceeded, SparseCode

from .losses import explained_variance_of

if TYPE_CHECKING:
    from .model import SparseAutoencoder


def sparse_forward(
    sae: SparseAutoencoder, x: Tensor, backend: str, gate: DensityGate, dense_fallback: bool
) -> tuple[Tensor, SparseCode, dict[str, Tensor]] | None:
    """x [B, d_in] (checked, in the parameters' dtype) -> (reconstructed, SparseCode, loss_dict).

    `gate` holds the model's sparse-path state. With `dense_fallback` (backend auto) this returns
    None when the batch should run on the dense path instead (codes wider than the gate's threshold).
    """
    cfg = sae.cfg
    if dense_fallback and (gate.dense or (cfg.activation == "topk" and gate.too_wide(cfg.k))):
        return None
    ops = backend_ops(backend)
    mode = cfg.normalize_activations
    b_dec_in = sae.b_dec if cfg.apply_b_dec_to_input else torch.zeros_like(sae.b_dec)  # [d_in]
    stats = None
    if mode == "expected_average_only_in":
        mean = sae.activation_mean.to(x.dtype)  # [d_in]
        enc_in, shift, bias = x, mean + b_dec_in, sae.b_dec + mean
    elif mode == "layer_norm":
        enc_in, stats = sae.normalize(x)  # x_n [B, d_in]
        shift, bias = b_dec_in, sae.b_dec
    else:
        enc_in, shift, bias = x, b_dec_in, sae.b_dec

    code = _encode(ops, sae, enc_in, shift, gate, dense_fallback)  # [B, K]
    if code is None or (dense_fallback and gate.too_wide(code.indices.shape[1])):
        return None
    out = ops.decode(code.indices, code.values, sae.W_dec, bias)  # [B, d_in]

    if mode == "layer_norm":
        mse = F.mse_loss(out, enc_in)  # out is recon_n, enc_in is x_n
        reconstructed = sae.denormalize(out, stats)
        residual = None
    else:
        mse = F.mse_loss(out, x)  # one fused kernel each way, vs 3-4 passes for (out - x).pow(2).mean()
        reconstructed = out
        residual = mse.detach() * x.numel()  # sum ||x - reconstructed||^2, already computed
    decoder_norms = sae.W_dec.norm(dim=-1)  # [d_sae]
    l1 = cfg.l1_coeff * (code.values * decoder_norms[code.indices]).sum(-1).mean()
    loss = mse + l1 if cfg.activation == "relu" else mse
    with torch.no_grad():
        l0 = (code.values > 0).sum(-1).float().mean()
        explained_variance = explained_variance_of(x, reconstructed, residual)
    loss_dict = {"loss": loss, "mse": mse, "l1": l1, "l0": l0, "explained_variance": explained_variance}
    return reconstructed, code, loss_dict


def _encode(ops, sae: SparseAutoencoder, x: Tensor, shift: Tensor, gate: DensityGate,
            dense_fallback: bool) -> SparseCode | None:
    """The backend's encode, with the capacity policy of fixed-capacity ReLU encoders (Triton).

    An overflow (CapacityExceeded) is retried with room for the widest token plus 25%, kept for the
    next batches, or under auto sends a batch wider than the density threshold to the dense path
    (None). A grown capacity shrinks back once the widest token uses less than half of it; that
    check reads one number from the device per step, only while a capacity is set.
    """
    cfg = sae.cfg
    if cfg.activation != "relu":
        return ops.encode(x, shift, sae.W_enc, sae.b_enc, cfg.activation, k=cfg.k)
    try:
        code = ops.encode(x, shift, sae.W_enc, sae.b_enc, "relu", capacity=gate.capacity)
    except CapacityExceeded as err:
        if dense_fallback and gate.too_wide(err.max_active):
            return None
        gate.capacity = _headroom(err.max_active, cfg.d_sae)
        log_once("relu-capacity", "ReLU encode: a token with %d active latents overflowed %d slots; "
                 "retrying with %d", err.max_active, err.capacity, gate.capacity)
        return ops.encode(x, shift, sae.W_enc, sae.b_enc, "relu", capacity=gate.capacity)
    if gate.capacity is not None:
        width = int((code.values > 0).sum(-1).max()) if code.values.numel() else 0
        if 2 * width < gate.capacity:
            gate.capacity = _headroom(width, cfg.d_sae)
    return code


def _headroom(width: int, d_sae: int) -> int:
    """Slots for codes up to `width` wide: width + 25%, rounded up to a multiple of 64, at most d_sae."""
    return min(d_sae, max(64, -(-(width * 5 // 4) // 64) * 64))
