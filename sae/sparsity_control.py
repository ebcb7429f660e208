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

Where u starts: u_0 = p * log(v), so that the coefficient starts at v^p times the configured one.
v = the per-element variance of the SAE's normalized input over the first batch (`input_variance`:
the mse of reconstructing every row by the mean); p = the architecture's `target_l0_start_power`.
jumprelu, p = 1: its penalty counts active latents and does not scale with the input, while the mse
scales as v, so the coefficient that balances them scales as v; with this start --l0_coeff means the
same at any activation scale (under layer_norm v ~ 1 and u_0 ~ 0). Measured with bench/quality.py's
set-up (SmolLM2-135M layer 12, v = 19.8 on the first batch, d_sae 4608, jumprelu --target_l0 64, 132
steps at the default lr 3.77e-4; held-out L0): from u_0 = 0 (l0_coeff 1e-3 in raw units) the integral,
at gain * lr = 0.019 a step, could not climb the factor ~20 within the run and L0 drifted to 80.9
(+26%); from u_0 = log(v) it ended at 68.3 (+7%). relu keeps p = 0 (see relu.py).
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

    def __init__(self, target: float, gain: float, device: torch.device, start: float = 1.0) -> None:
        """`start`: the multiplier before the first update, exp(u_0) (`start_multiplier`)."""
        if isinstance(target, bool) or not isinstance(target, int | float) or not 0 < target < math.inf:
            raise ValueError(f"target_l0 must be a finite number > 0; got {target!r}")
        if not 0 < start < math.inf:
            raise ValueError(f"the controller's start multiplier must be a finite number > 0; got {start!r} "
                             "(the first batch's input variance is 0 or not finite: check the data)")
        self.target, self.gain = float(target), float(gain)
        self.state = torch.zeros(2, dtype=torch.float64, device=device)  # u, the last e
        self.state[0] = math.log(start)

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


@torch.no_grad()
def input_variance(model, x: Tensor, chunk_rows: int = 4096) -> float:
    """v = (1 / (N d_in)) sum_n ||x_n - mean_n x_n||^2 over x [N, d_in] in the SAE's normalized space
    (x_n = model.normalize(x)): the per-element variance, the mse of reconstructing each row by the mean.
    Sums in float64 over chunks of `chunk_rows` rows on the model's device."""
    device = model.W_dec.device
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=device)
    squares = torch.zeros((), dtype=torch.float64, device=device)
    for chunk in x.split(chunk_rows):
        x_n = model.normalize(chunk.to(device, torch.float32))[0].double()  # [n, d_in]
        total += x_n.sum(0)
        squares += x_n.pow(2).sum()
    n = max(x.shape[0], 1)
    return float((squares / n - (total / n).pow(2).sum()) / x.shape[1])


def start_multiplier(variance: float, power: float) -> float:
    """exp(u_0) = v^p (module docstring)."""
    return variance ** power
