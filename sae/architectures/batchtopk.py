"""BatchTopK: the batch's B*k largest pre-activations in training, a learned global threshold at inference.

Bussmann et al. (2024), "BatchTopK sparse autoencoders", trained as SAELens and dictionary_learning do:

    training   f = ReLU of the B*k largest pre-activations of the batch of B tokens (rule BatchTopK):
               k active latents per token on average, anywhere from 0 to d_sae for one token; plus
               AuxK (auxk.py) once latents are dead
    threshold  theta (`threshold`, a 0-d buffer) estimates where the inference form keeps k per token.
               After each training batch, with v = the batch's smallest positive selected
               pre-activation (averaged over the ranks, each of which selects within its own batch):
                   n <- n + 1;   theta <- theta + max(1 / n, 1 - THRESHOLD_DECAY) * (v - theta)
               a running mean over the first 1 / (1 - THRESHOLD_DECAY) = 100 batches, then an
               exponential moving average of weight 0.01 (SAELens' topk_threshold_lr, which starts its
               average at 0 instead; dictionary_learning starts at its first v after 1000 steps, weight
               0.001). A batch without a positive selection leaves theta and n as they are.
    inference  f_i = pre_i * H(pre_i - theta)  (rule Threshold(theta)); theta >= 0, so this is the ReLU
               of the pre-activations above theta. Before any training batch theta = 0: plain ReLU.

SAELens has no BatchTopK inference SAE: it saves a trained BatchTopK as a JumpReLU whose per-latent
threshold is theta everywhere, and so does the export (architecture "jumprelu", `threshold` [d_sae]).
Under FSDP2 each rank selects B_rank * k within its own batch, as sparsify and dictionary_learning do
per device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from saetron.kernels.selection import BatchTopK as BatchTopKRule
from saetron.kernels.selection import Selection, SelectionRule, Threshold
from saetron.kernels.sparse_code import SparseCode

from .auxk import AuxKArchitecture
from .base import check_k
from .registry import register

THRESHOLD_DECAY = 0.99


def smallest_positive(selection: Selection) -> tuple[Tensor, Tensor]:
    """(mean over ranks of each rank's smallest positive selected pre-activation, how many ranks had
    one): two 0-d fp64 tensors, the same on every rank (one all-reduce when distributed)."""
    _, pre, valid = selection
    positive = valid & (pre > 0)  # [B, K]
    candidates = torch.where(positive, pre.detach().double(), torch.inf).reshape(-1)
    v = torch.cat([candidates, candidates.new_full((1,), torch.inf)]).amin()  # inf for an empty batch
    has = positive.any()
    stats = torch.stack([torch.where(has, v, 0.0), has.double()])  # [2]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stats)
    return stats[0] / stats[1].clamp_min(1.0), stats[1]


@register
class BatchTopK(AuxKArchitecture):
    """B*k per batch in training (BatchTopK rule), a global threshold at inference (Threshold rule)."""

    name = "batchtopk"
    saelens_name = "jumprelu"
    sparsity_in_loss = False

    def __init__(self, cfg, device=None, dtype=None) -> None:
        super().__init__(cfg, device, dtype)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32, device=device))
        self.register_buffer("threshold_batches", torch.zeros((), dtype=torch.int64, device=device))

    @classmethod
    def check_config(cls, cfg) -> None:
        check_k(cfg, "active latents per token, on average over a batch")

    def selection_rules(self) -> list[SelectionRule]:
        if self.training:
            return [BatchTopKRule(self.cfg.k), *self.auxk_rules()]
        return [Threshold(self.threshold)]

    def dense_activation(self, pre: Tensor) -> Tensor:
        if not self.training:
            return pre * (pre > self.threshold)
        top = torch.topk(pre.reshape(-1), pre.shape[0] * self.cfg.k).indices  # [B*k]
        flat = torch.zeros_like(pre).view(-1).scatter(0, top, pre.reshape(-1)[top].relu())
        return flat.view_as(pre)

    @torch.no_grad()
    def observe(self, selections: Sequence[Selection], code: SparseCode) -> None:
        v, ranks = smallest_positive(selections[0])
        seen = ranks > 0
        n = self.threshold_batches + seen.long()
        weight = (1.0 / n.clamp_min(1).double()).clamp_min(1 - THRESHOLD_DECAY)
        updated = self.threshold.double() + weight * (v - self.threshold.double())
        self.threshold.copy_(torch.where(seen, updated, self.threshold.double()))
        self.threshold_batches.copy_(n)

    def saelens_tensors(self) -> dict[str, Tensor]:
        return {"threshold": self.threshold.expand(self.cfg.d_sae)}
