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
