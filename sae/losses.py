"""Metric definitions shared by the SparseAutoencoder's forward (every backend) and the trainer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from saetron.kernels.sparse_code import SparseCode


def explained_variance_of(x: Tensor, reconstructed: Tensor, residual: Tensor | None = None) -> Tensor:
    """1 - sum ||x - x_hat||^2 / sum ||x - mean_b x||^2 over a batch x, x_hat [B, d] (fp32 scalar).

    `residual` (sum ||x - x_hat||^2) may be passed when the caller has it already. Two fused
    mse_loss passes instead of seven elementwise ones: 2.6 vs 7.7 ms at [4096, 576] on one thread
    (torch.var over dim 0 measured 19.6 ms: a strided reduction).
    """
    x32 = x.float()
    if residual is None:
        residual = F.mse_loss(reconstructed.float(), x32, reduction="sum")
    total = F.mse_loss(x32, x32.mean(0).expand_as(x32), reduction="sum")
    return 1.0 - residual.float() / total.clamp_min(torch.finfo(torch.float32).tiny)


def firing_counts(features: Tensor | SparseCode, d_sae: int) -> Tensor:
    """Tokens on which each latent fired: int64 [d_sae], from dense features [B, d_sae] or a SparseCode."""
    if isinstance(features, SparseCode):
        return torch.bincount(features.indices[features.values > 0], minlength=d_sae)
    return (features > 0).sum(0)


def fired_latents(features: Tensor | SparseCode, d_sae: int) -> Tensor:
    """Which latents fired in a batch: bool [d_sae], from dense features [B, d_sae] or a SparseCode."""
    return firing_counts(features, d_sae) > 0


# Rows whose norm exceeds this multiple of the median row norm are outliers (on SmolLM2-135M the
# attention sinks at position 1 have norms 25-120x the median and carry 67-77% of the variance): the
# "normal-row" metrics leave them out so that a few rows cannot decide the figure.
NORMAL_NORM_RATIO = 10.0


def normal_rows(x: Tensor, median_norm: Tensor | float, ratio: float = NORMAL_NORM_RATIO) -> Tensor:
    """bool [B]: rows of x [B, d] with ||x_b|| <= ratio * median_norm (a NaN/Inf row is not normal)."""
    return x.float().norm(dim=-1) <= ratio * median_norm


def per_token_fvu(x: Tensor, reconstructed: Tensor, mean: Tensor, residual: Tensor | None = None) -> Tensor:
    """Fraction of variance unexplained per token, fp32 [B]: ||x_b - x_hat_b||^2 / ||x_b - mean||^2.

    x, reconstructed [B, d]; `mean` [d] is the data's mean (the evaluated rows' mean, or the
    trainer's activation-mean estimate). Its median over tokens (`median_fvu`) says how a typical
    token is reconstructed, where the pooled explained variance is dominated by the largest rows.
    A row equal to the mean (zero denominator) reads +inf unless reconstructed exactly (then NaN).
    `residual` [B] fp32: ||x_b - x_hat_b||^2 when the caller has it already (saves a pass over x).
    """
    x32 = x.float()
    if residual is None:
        residual = (x32 - reconstructed.float()).pow(2).sum(-1)  # [B]
    return residual / (x32 - mean.float()).pow(2).sum(-1)
