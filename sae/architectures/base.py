"""Architecture: everything that distinguishes one SAE architecture, behind one small interface.

An architecture is an nn.Module submodule of the SparseAutoencoder (`sae.architecture`): its own
parameters and buffers (a learned threshold, dead-latent counters) are saved, loaded, sharded and
optimized with the SAE's. The forward (saetron.sae.model) asks it, per batch:

    selection_rules()        the rules the encode applies to pre = (x - shift) @ W_enc + b_enc
                             (kernels/selection.py); `self.training` tells training from inference.
                             The first rule's Selection is the code; others feed auxiliary losses.
    activate(selections)     the features of the code: a small differentiable torch function on the
                             first Selection's pre [B, K] (a straight-through estimator lives here),
                             returning SparseCode(indices, values) with values 0 at padding
    sparsity_loss(inputs)    its sparsity loss, reported as loss_dict[sparsity_key]; part of the loss
                             when `sparsity_in_loss` (the trainer warms it up by l1_warmup_steps)
    auxiliary_losses(inputs) more loss terms (e.g. an auxiliary reconstruction), each reported and added
    observe(selections, code)  after a training forward, without gradients: update buffers. Every
                             rank runs it on its own batch: what it writes must be reduced over the
                             ranks (or derived from something global) so that all ranks agree
    dense_activation(pre)    the same map dense, [B, d_sae] -> [B, d_sae]: the oracle of the tests

Every architecture has `dead_latents` (sae/dead_latents.py), which the forward updates before
`observe` on each training batch: which latents are dead, the same on every rank (AuxK's candidates,
the trainer's dead_fraction).

and for persistence: check_config(cfg) (its config fields), saelens_architecture(), saelens_config()
and saelens_tensors() (SAELens' architecture name, the extra cfg.json fields and tensors).

A new architecture is one file in this folder defining a subclass decorated with @register (the
package imports every module in it), plus its tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from saetron.kernels.selection import Selection, SelectionRule
from saetron.kernels.sparse_code import SparseCode

from ..dead_latents import DeadLatents

if TYPE_CHECKING:
    from ..config import SAEConfig


@dataclass
class LossInputs:
    """What a batch's forward hands an architecture's losses."""

    selections: Sequence[Selection]
    """One Selection [B, K_r] per rule of selection_rules()."""
    code: SparseCode
    """The features (activate's output)."""
    decoder_norms: Tensor
    """||W_dec[i]|| [d_sae]."""
    l1: Tensor
    """l1_coeff * mean over tokens of sum_i f_i ||W_dec[i]||: the L1 term every forward reports."""
    enc_in: Tensor
    """[B, d_in] the encoder's input (normalized space), the reconstruction's target."""
    out: Tensor
    """[B, d_in] the decode's output; out - enc_in = recon_n - x_n."""
    decode: Callable[[SparseCode], Tensor]
    """The backend's decode without bias: a code [B, K] -> sum_j values * W_dec[indices], [B, d_in]."""


def check_k(cfg, meaning: str) -> None:
    """ValueError unless cfg.k is an int in [1, d_sae] (`meaning`: what k is, for the message)."""
    if cfg.k is None:
        raise ValueError(f"activation={cfg.activation!r} needs k, an int in [1, d_sae={cfg.d_sae}] "
                         f"({meaning}); got k=None")
    if isinstance(cfg.k, bool) or not isinstance(cfg.k, int) or not 1 <= cfg.k <= cfg.d_sae:
        raise ValueError(f"k must be an int in [1, d_sae={cfg.d_sae}]; got k={cfg.k!r}")


class Architecture(nn.Module):
    """Base class; subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    """SAEConfig.activation value (and --activation choice)."""
    saelens_name: ClassVar[str]
    """SAELens' `architecture` in cfg.json."""
    sparsity_key: ClassVar[str] = "l1"
    """loss_dict key of sparsity_loss (\"l1\": the generic L1 term)."""
    sparsity_in_loss: ClassVar[bool]
    """Whether sparsity_loss is added to the loss (ReLU) or only reported (TopK)."""
    target_l0_gain: ClassVar[float | None] = None
    """--target_l0's integral gain per unit of learning rate (sae/sparsity_control.py): how hard the
    controller may push this architecture's sparsity coefficient; None: no --target_l0."""
    target_l0_start_power: ClassVar[float] = 0.0
    """p: --target_l0 starts the sparsity coefficient at v^p times the configured one, v = the per-element
    variance of the first batch's normalized input (sae/sparsity_control.py); 0: as configured."""

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.dead_latents = DeadLatents(cfg.d_sae, cfg.dead_window, device)

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """ValueError (with the bad value and what is allowed) unless cfg's fields suit this architecture."""

    def selection_rules(self) -> list[SelectionRule]:
        raise NotImplementedError

    def activate(self, selections: Sequence[Selection]) -> SparseCode:
        """Default: ReLU of the first Selection's pre-activations, 0 at padding."""
        indices, pre, valid = selections[0]
        return SparseCode(indices, torch.where(valid, torch.relu(pre), 0))

    def dense_activation(self, pre: Tensor) -> Tensor:
        raise NotImplementedError

    def sparsity_loss(self, inputs: LossInputs) -> Tensor:
        """Default: the generic L1 term."""
        return inputs.l1

    def auxiliary_losses(self, inputs: LossInputs) -> dict[str, Tensor]:
        """Default: none."""
        return {}

    @torch.no_grad()
    def observe(self, selections: Sequence[Selection], code: SparseCode) -> None:
        """Default: nothing to update."""

    def saelens_architecture(self) -> str:
        return self.saelens_name

    def saelens_config(self) -> dict:
        """Extra cfg.json fields of the SAELens export."""
        return {}

    def saelens_tensors(self) -> dict[str, Tensor]:
        """Extra tensors of the SAELens export's sae_weights.safetensors."""
        return {}
