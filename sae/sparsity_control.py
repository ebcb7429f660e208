"""--target_l0: a controller that moves the sparsity coefficient until the L0 reaches a target.

For the architectures whose sparsity term is in the loss (relu: l1_coeff * L1, jumprelu: l0_coeff * its L0
penalty) the trainer multiplies that term by m, so the coefficient in effect is coeff * m. After each
step, with L0 = the step's mean active latents per token over all ranks (one all-reduce of a scalar, so
every rank holds the same state):

    e    = clamp(log(L0 / target), -MAX_ERROR, MAX_ERROR)       the error, in log space
    u   <- u + gain * lr * e                                     integral (not during the sparsity warm-up)
    m    = exp(u + KP * e)                                       proportional-integral, in log space

The plant integrates: Adam moves the weights (and JumpReLU's thresholds) by about lr per step for as
long as the coefficient is off its balance point, so L0 drifts until that point is met, at a speed
proportional to the learning rate. The proportional term damps that drift; the integral term finds the
balance point where L0 = target (which the proportional term alone would miss), at a speed tied to the
learning rate as well (gain * lr per step; the gain is the architecture's `target_l0_gain`, set from
measurements in its file: relu 10, jumprelu 50), so that the loop keeps its shape at any lr and
schedule: it slows down with the lr's warm-up and decay instead of winding up while the weights cannot
follow. The clamp bounds the step of a far-off start (ReLU begins at L0 ~ d_sae / 2), so the
coefficient ramps up instead of jumping and overshooting into dead latents. The state (u and the last
e) is a 2-vector on the device, checkpointed with the run; nothing here synchronizes with the host.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

KP = 2.0  # exp(KP * e): an L0 twice the target multiplies the coefficient by 4 at once
MAX_ERROR = 1.0  # |e| is clamped here: L0 beyond e times the target counts as e times


class L0Controller:
    """Proportional-integral control of the sparsity coefficient's multiplier m (see the module doc)."""

    def __init__(self, target: float, gain: float, device: torch.device) -> None:
        if isinstance(target, bool) or not isinstance(target, int | float) or not 0 < target < math.inf:
            raise ValueError(f"target_l0 must be a finite number > 0; got {target!r}")
        self.target, self.gain = float(target), float(gain)
        self.state = torch.zeros(2, dtype=torch.float64, device=device)  # u, the last e

    def multiplier(self) -> Tensor:
        """m = exp(u + KP * e), a 0-d fp64 tensor (the same on every rank)."""
        return torch.exp(self.state[0] + KP * self.state[1])

    @torch.no_grad()
    def update(self, l0: Tensor, lr: float, integrate: bool = True) -> None:
        """After a step, from l0, this rank's mean active latents per token (0-d). Collective when
        distributed."""
        l0 = l0.detach().to(self.state.device, torch.float64).reshape(1).clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(l0)
            l0 /= dist.get_world_size()
        error = torch.log(l0.clamp_min(1e-3) / self.target).clamp(-MAX_ERROR, MAX_ERROR)[0]
        if integrate:
            self.state[0] += self.gain * lr * error
        self.state[1] = error

    def state_dict(self) -> dict:
        return {"l0_control": self.state.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.state.copy_(state["l0_control"])
