"""AuxK: the auxiliary loss that revives dead latents, shared by `topk` and `batchtopk`.

Gao et al. (2024), "Scaling and evaluating sparse autoencoders", Appendix B.1; normalized as
EleutherAI's sparsify normalizes it. In a training forward with n_dead > 0 dead latents
(sae/dead_latents.py, the same set on every rank), the encode applies one more rule to the same
pre-activations, RowTopK(k_aux, mask=dead), and

    k_aux   = min(d_in // 2, d_sae)                   (at least 1)
    e       = x_n - recon_n                           [B, d_in] the residual, detached
    e_hat   = sum_j ReLU(pre_dead_j) W_dec[j]         [B, d_in] each token's k_aux largest dead
                                                      pre-activations (all of them when n_dead < k_aux),
                                                      decoded without bias
    auxk    = aux_k_coeff * min(n_dead / k_aux, 1) * mean over tokens and elements of (e_hat - e)^2

Normalization: sparsify divides its AuxK term and its reconstruction loss (the FVU) by the same total
variance of the batch, so relative to the reconstruction loss its term is mean (e_hat - e)^2 / mean e^2;
saetron's reconstruction loss is the plain mse, so the same ratio is the mse of (e_hat, e) above.
The factor min(n_dead / k_aux, 1) is sparsify's (a loss that shrinks while few latents are dead).
OpenAI's reference code divides by the variance of the residual e instead, which weighs the term more
as the reconstruction improves; saetron follows sparsify, its reference for quality.

Gradients: e is detached and only dead latents are selected, so the term reaches only the dead latents'
encoder columns, encoder biases and decoder rows (and b_dec through the encoder input when
apply_b_dec_to_input: pre depends on it for every latent). Without dead latents (e.g. before
`dead_window` tokens have passed) the rule is not added and the term is 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from saetron.kernels.selection import RowTopK, Selection, SelectionRule
from saetron.kernels.sparse_code import SparseCode

from .base import Architecture, LossInputs

AUXK_KEY = "auxk"  # its loss_dict key


def k_aux(cfg) -> int:
    """Gao et al.'s heuristic d_in / 2, at most d_sae."""
    return max(1, min(cfg.d_in // 2, cfg.d_sae))


class AuxKArchitecture(Architecture):
    """An architecture whose training forward adds AuxK (see the module docstring)."""

    def auxk_rules(self) -> list[SelectionRule]:
        """[RowTopK(k_aux, dead)] in a training forward with dead latents and aux_k_coeff > 0, else [].

        Once `dead_window` tokens have been counted, reads whether any latent is dead on the host (one
        synchronization per training step); before, none can be.
        """
        if not self.training or self.cfg.aux_k_coeff == 0 or not self.dead_latents.may_have_dead():
            return []
        dead = self.dead_latents.mask
        if not bool(dead.any()):
            return []
        return [RowTopK(k_aux(self.cfg), dead)]

    def auxiliary_losses(self, inputs: LossInputs) -> dict[str, Tensor]:
        if not self.training or self.cfg.aux_k_coeff == 0:
            return {}
        if len(inputs.selections) < 2:  # no dead latent this step
            dtype = torch.promote_types(inputs.out.dtype, torch.float32)
            return {AUXK_KEY: inputs.out.new_zeros((), dtype=dtype)}
        return {AUXK_KEY: auxk_loss(inputs.selections[-1], inputs, self.dead_latents.mask, self.cfg)}


def auxk_loss(selection: Selection, inputs: LossInputs, dead: Tensor, cfg) -> Tensor:
    """aux_k_coeff * min(n_dead / k_aux, 1) * mse(e_hat, e) for the dead latents' selection [B, k_aux]."""
    indices, pre, valid = selection
    e_hat = inputs.decode(SparseCode(indices, torch.where(valid, torch.relu(pre), 0)))  # [B, d_in]
    residual = (inputs.enc_in - inputs.out).detach()  # [B, d_in]: x_n - recon_n
    dtype = torch.promote_types(e_hat.dtype, torch.float32)  # fp32 at least (bf16 training), fp64 stays
    scale = (dead.sum().to(dtype) / k_aux(cfg)).clamp(max=1.0)
    return cfg.aux_k_coeff * scale * F.mse_loss(e_hat.to(dtype), residual.to(dtype))
