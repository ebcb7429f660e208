"""ReLU: f = ReLU(pre); sparsity from the L1 penalty l1_coeff * sum_i f_i ||W_dec[i]|| in the loss."""

from __future__ import annotations

from torch import Tensor

from saetron.kernels.selection import SelectionRule, Threshold

from .base import Architecture
from .registry import register


@register
class ReLU(Architecture):
    """Selects every positive pre-activation (Threshold 0, as wide as the widest token)."""

    name = "relu"
    saelens_name = "standard"
    sparsity_in_loss = True

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.k is not None:
            raise ValueError(f"k={cfg.k!r} is not used with activation='relu' (a ReLU SAE's sparsity comes "
                             "from l1_coeff); leave k unset")

    def selection_rules(self) -> list[SelectionRule]:
        return [Threshold(0.0)]

    def dense_activation(self, pre: Tensor) -> Tensor:
        return pre.relu()
