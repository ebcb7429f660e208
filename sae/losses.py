"""Metric definitions shared by the dense (reference) and sparse forwards of the SparseAutoencoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
