"""SparseCode: the active latents of a batch in padded [B, K] form, shared by every backend."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class SparseCode(NamedTuple):
    """Active latents of a batch in padded form: row b holds its K largest activations.

    indices: [B, K] int64 latent ids in [0, d_sae). Padding slots hold any valid id.
    values:  [B, K] activations (>= 0). Padding slots and inactive top-k picks hold 0, so a
             padded slot contributes nothing to a decode and receives a zero gradient.
    """

    indices: Tensor
    values: Tensor

    def to_dense(self, d_sae: int) -> Tensor:
        """[B, d_sae] dense activations (zeros where inactive)."""
        out = torch.zeros(self.values.shape[0], d_sae, dtype=self.values.dtype, device=self.values.device)
        return out.scatter_add(-1, self.indices, self.values)


class CapacityExceeded(RuntimeError):
    """A sparse encode found a token with more active latents than its buffer holds.

    Raised by fixed-capacity encoders (ReLU on the Triton path) so that the dispatcher can fall
    back to a wider capacity or the dense path; carries the largest count seen.
    """

    def __init__(self, max_active: int, capacity: int) -> None:
        super().__init__(f"a token has {max_active} active latents, over the capacity {capacity}")
        self.max_active = max_active
        self.capacity = capacity
