"""Dead latents: one definition, shared by AuxK and the trainer's dead_fraction.

Each training forward updates, for the B tokens of every rank together (B_global = B * world size):

    fired_i  = latent i has an activation > 0 on some token of the step's batch, on any rank
    since_i <- 0 if fired_i else since_i + B_global           int64 [d_sae], 0 at the start
    dead_i   = since_i >= window                              window = SAEConfig.dead_window tokens

so a latent is dead only once `window` tokens have passed without it firing (sparsify's and OpenAI's
convention: every latent starts alive). With several ranks, `fired` is all-reduced (MAX of a [d_sae]
uint8, one small collective per training step) before the update, so `since` and the dead mask are the
same on every rank; every rank must run the same number of training forwards (the trainer does) with
batches of the same size.

`tokens_since_fired` is a non-persistent buffer: it is training state, not part of the SAE's function,
so `sae.save` leaves it out; the trainer checkpoints it with its metrics (sae/metrics.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from saetron.kernels.sparse_code import SparseCode

from .losses import firing_counts


class DeadLatents(nn.Module):
    """Tokens since each latent last fired, over all ranks (see the module docstring)."""

    def __init__(self, d_sae: int, window: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.window = window
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.int64, device=device),
                             persistent=False)
        self.tokens_counted = 0  # on the host: no latent can be dead before `window` tokens were counted

    @torch.no_grad()
    def update(self, code: SparseCode) -> None:
        """Count a training batch's code [B, K] (this rank's part of the global batch)."""
        fired = (firing_counts(code, self.tokens_since_fired.numel()) > 0).to(torch.uint8)  # [d_sae]
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:
            dist.all_reduce(fired, op=dist.ReduceOp.MAX)
        self.tokens_since_fired.add_(code.indices.shape[0] * world).masked_fill_(fired.bool(), 0)
        self.tokens_counted += code.indices.shape[0] * world

    @torch.no_grad()
    def restore(self, tokens_since_fired: Tensor) -> None:
        """Set the counts (a resumed run's); latents may be dead from the next step on."""
        self.tokens_since_fired.copy_(tokens_since_fired)
        self.tokens_counted = max(self.tokens_counted, self.window)

    def may_have_dead(self) -> bool:
        """False while fewer than `window` tokens were counted (no host synchronization)."""
        return self.tokens_counted >= self.window

    @property
    def mask(self) -> Tensor:
        """bool [d_sae]: the dead latents."""
        return self.tokens_since_fired >= self.window

    def fraction(self) -> Tensor:
        """The fraction of latents that are dead (0-d fp64 tensor, no host synchronization)."""
        return self.mask.double().mean()
