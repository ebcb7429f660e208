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
    # --target_l0: ReLU's L0 answers its coefficient late and then steeply (a whole cloud of
    # pre-activations crosses 0 as the biases move), and a ReLU latent pushed below 0 on all data never
    # comes back, so its integral is slow: at 30 (jumprelu's pace) L0 8 overshot to 0.7 on the
    # synthetic test store, at 10 it settles within 2% (tests/test_target_l0.py).
    target_l0_gain = 10.0
    # The start stays l1_coeff as configured (power 0), not l1_coeff * sqrt(v) as the L1's degree would
    # have it (sae/sparsity_control.py): at SmolLM2 layer 12 (v = 19.8, --target_l0 64, 132 steps at the
    # default lr) the sqrt(v) start collapsed the reconstruction faster (held-out EV over normal rows 0.007
    # vs 0.19, L0 750 vs 812: both far from 64 at that budget); a ReLU start wants the weak side.

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.k is not None:
            raise ValueError(f"k={cfg.k!r} is not used with activation='relu' (a ReLU SAE's sparsity comes "
                             "from l1_coeff); leave k unset")

    def selection_rules(self) -> list[SelectionRule]:
        return [Threshold(0.0)]

    def dense_activation(self, pre: Tensor) -> Tensor:
        return pre.relu()
