"""TopK: f = ReLU of each token's k largest pre-activations; sparsity is structural (L1 reported only)."""

from __future__ import annotations

import torch
from torch import Tensor

from saetron.kernels.selection import RowTopK, SelectionRule

from .base import Architecture
from .registry import register


@register
class TopK(Architecture):
    """Selects each token's k largest pre-activations (RowTopK), then ReLU (a non-positive pick is 0)."""

    name = "topk"
    saelens_name = "topk"
    sparsity_in_loss = False

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.k is None:
            raise ValueError(f"activation='topk' needs k, an int in [1, d_sae={cfg.d_sae}]; got k=None")
        if isinstance(cfg.k, bool) or not isinstance(cfg.k, int) or not 1 <= cfg.k <= cfg.d_sae:
            raise ValueError(f"k must be an int in [1, d_sae={cfg.d_sae}]; got k={cfg.k!r}")

    def selection_rules(self) -> list[SelectionRule]:
        return [RowTopK(self.cfg.k)]

    def dense_activation(self, pre: Tensor) -> Tensor:
        values, indices = torch.topk(pre, self.cfg.k, dim=-1)  # [B, k]
        return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))

    def saelens_config(self) -> dict:
        return {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}
