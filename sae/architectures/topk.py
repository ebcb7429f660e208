"""TopK: f = ReLU of each token's k largest pre-activations; sparsity is structural (L1 reported only).

Training adds AuxK (auxk.py) once latents are dead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saetron.kernels.selection import RowTopK, SelectionRule

from .auxk import AuxKArchitecture
from .base import check_k
from .registry import register


@register
class TopK(AuxKArchitecture):
    """Selects each token's k largest pre-activations (RowTopK), then ReLU (a non-positive pick is 0)."""

    name = "topk"
    saelens_name = "topk"
    sparsity_in_loss = False

    @classmethod
    def check_config(cls, cfg) -> None:
        check_k(cfg, "active latents per token")

    def selection_rules(self) -> list[SelectionRule]:
        return [RowTopK(self.cfg.k), *self.auxk_rules()]

    def dense_activation(self, pre: Tensor) -> Tensor:
        values, indices = torch.topk(pre, self.cfg.k, dim=-1)  # [B, k]
        return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))

    def saelens_config(self) -> dict:
        return {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}
