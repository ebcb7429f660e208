"""Input normalization of an SAE: what the encoder sees, what the decoder adds back, the SAELens fold.

Modes (SAEConfig.normalize_activations), with mu = the `activation_mean` buffer [d_in]:

    expected_average_only_in  x_n = x - mu; recon = recon_n + mu. saetron's meaning (the seed's): a
                              centering. SAELens uses the same name for a norm *rescaling*; the two
                              are not interchangeable.
    layer_norm                per token, SAELens' convention: m = mean(x), s = std(x) (unbiased),
                              x_n = (x - m) / (s + 1e-5); recon = recon_n * s + m.
    none                      identity.

The forward feeds a backend (`encoder_operands`): the encoder input, the `shift` the encode subtracts
and the `bias` the decode adds, so that a centering costs no pass of its own:

    expected_average_only_in  enc_in = x,    shift = mu + b_dec*a,  bias = b_dec + mu  (output in input units)
    layer_norm                enc_in = x_n,  shift = b_dec*a,       bias = b_dec       (output is recon_n)
    none                      enc_in = x,    shift = b_dec*a,       bias = b_dec
(a = apply_b_dec_to_input.) In every mode the decode's output minus enc_in equals recon_n - x_n, so
the mse is mean (out - enc_in)^2.

SAELens export (no mean buffer there): b_dec' = b_dec + mu, and b_enc' = b_enc - mu @ W_enc unless
apply_b_dec_to_input (then x - b_dec' subtracts mu already); layer_norm exports as SAELens'
"layer_norm", the others as "none".
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

LAYER_NORM_EPS = 1e-5  # SAELens' value, so a layer_norm SAE exports to SAELens unchanged.
Stats = tuple[Tensor, Tensor] | None  # layer_norm's per-token (mean, std), each [B, 1]


class EncoderOperands(NamedTuple):
    """What the forward gives the backend for a batch (see the module docstring)."""

    enc_in: Tensor  # [B, d_in]: the encoder's input, and the mse's target
    shift: Tensor  # [d_in]: subtracted from enc_in before the encoder GEMM
    bias: Tensor  # [d_in]: added after the decoder
    stats: Stats  # what `reconstruct` needs (layer_norm)


class Normalization:
    """One of the three modes; stateless (the mean is the SAE's buffer, passed in)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def normalize(self, x: Tensor, mean: Tensor) -> tuple[Tensor, Stats]:
        """x [B, d_in] -> (x_n [B, d_in], the statistics `denormalize` needs)."""
        if self.mode == "expected_average_only_in":
            return x - mean.to(x.dtype), None
        if self.mode == "layer_norm":
            mu = x.mean(-1, keepdim=True)  # [B, 1]
            std = (x - mu).std(-1, keepdim=True)  # [B, 1]
            return (x - mu) / (std + LAYER_NORM_EPS), (mu, std)
        return x, None

    def denormalize(self, recon_n: Tensor, stats: Stats, mean: Tensor) -> Tensor:
        """Inverse of `normalize` with the same token's statistics: [B, d_in] -> [B, d_in]."""
        if self.mode == "expected_average_only_in":
            return recon_n + mean.to(recon_n.dtype)
        if self.mode == "layer_norm":
            mu, std = stats
            return recon_n * std + mu
        return recon_n

    def encoder_operands(self, x: Tensor, mean: Tensor, b_dec: Tensor, apply_b_dec: bool) -> EncoderOperands:
        """The backend's operands for a batch x [B, d_in] (in the compute dtype)."""
        b_dec_in = b_dec if apply_b_dec else torch.zeros_like(b_dec)  # [d_in]
        if self.mode == "expected_average_only_in":
            mu = mean.to(x.dtype)
            return EncoderOperands(x, mu + b_dec_in, b_dec + mu, None)
        if self.mode == "layer_norm":
            x_n, stats = self.normalize(x, mean)
            return EncoderOperands(x_n, b_dec_in, b_dec, stats)
        return EncoderOperands(x, b_dec_in, b_dec, None)

    def reconstruct(self, out: Tensor, stats: Stats) -> Tensor:
        """The decode's output (with EncoderOperands.bias) -> the reconstruction in input units."""
        if self.mode == "layer_norm":
            mu, std = stats
            return out * std + mu
        return out

    @property
    def saelens_name(self) -> str:
        """SAELens' `normalize_activations` for this mode after the fold."""
        return "layer_norm" if self.mode == "layer_norm" else "none"

    @torch.no_grad()
    def saelens_fold(self, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, mean: Tensor,
                     apply_b_dec: bool) -> tuple[Tensor, Tensor]:
        """(b_enc', b_dec') under which SAELens' encode/decode of raw activations equals ours."""
        b_enc, b_dec = b_enc.detach().clone(), b_dec.detach().clone()
        if self.mode == "expected_average_only_in":
            mu = mean.detach().to(W_enc.dtype)
            b_dec = b_dec + mu
            if not apply_b_dec:
                # fp64 for the fold: the 1e-5 match with SAELens must not depend on d_in's rounding
                b_enc = (b_enc.double() - mu.double() @ W_enc.detach().double()).to(b_enc.dtype)
        return b_enc, b_dec
