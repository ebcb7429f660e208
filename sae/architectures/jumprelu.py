"""JumpReLU: learned per-latent thresholds, a straight-through estimator, an L0 penalty.

Rajamanoharan et al. (2024), "Jumping ahead: improving reconstruction fidelity with JumpReLU sparse
autoencoders":

    theta_i     = s * exp(l_i)        l = `log_threshold` [d_sae], a parameter starting at 0;
                                      s = `threshold_scale`, a 0-d buffer (the thresholds' start)
    f_i         = z_i * H(z_i - theta_i)                   z = pre-activations [B, d_sae]
    l0_penalty  = l0_coeff * mean over tokens of sum_i H(z_i - theta_i)        (part of the loss)

Straight-through estimator, kernel K = the rectangle on (-1/2, 1/2), bandwidth eps = jumprelu_bandwidth * s,
with u = (z_i - theta_i) / eps:

    df_i/dtheta_i = -(theta_i / eps) K(u)        dH/dtheta_i = -(1 / eps) K(u)
    df_i/dz_i     = H(z_i - theta_i) + [(theta_i / eps) K(u)]
    dH/dz_i       = [(1 / eps) K(u)]

The bracketed terms are there with `jumprelu_ste_to_input` (the default; Anthropic's variant, SAELens'
jumprelu_ste_to_input=True); without them it is DeepMind's, where the estimator reaches the thresholds
only. Why the default: in DeepMind's variant nothing moves a pre-activation up from below its
threshold (its gradient is H = 0 there), so the encoder only ever switches latents off and L0 drifts
down whatever the L0 penalty: measured on the pilot (SmolLM2 layer 15, 200 steps, --target_l0 64),
L0 fell from 64 to 48 with the penalty's coefficient anywhere in 1e-7..1e-3, where with the
estimator reaching the input the coefficient steers it (held-out L0 68 from a start at 1e-4, 56 from
1e-3, within the run's 150 JumpReLU steps).

The theta-derivatives are exact for the smoothed objective in which H(u) becomes the kernel's CDF
clamp(u + 1/2, 0, 1) in the penalty and f's jump of height theta at z = theta is spread over the
window along theta: f~(z, theta) = z - int_{-inf}^{theta} (t / eps) K((z - t) / eps) dt; the z-derivatives
are those of the penalty's same CDF and of f's jump spread along z, (z - theta) H(z - theta) + theta *
clamp(u + 1/2, 0, 1) (tests check each by finite differences). The kernel reaches down to theta - eps/2,
so training encodes with the rule Threshold(theta, margin=eps/2): its slots in (theta - eps/2, theta]
have the value 0 and carry these gradients. Inference: Threshold(theta), f = ReLU of the
pre-activations above theta.

Where the thresholds start. The paper starts every theta at 0.001 (in its input normalization) and
trains ~100k steps; a log-parameterized threshold moves by about lr times itself per Adam step, so it
needs log(theta_final / theta_start) / lr steps to reach its scale (SAELens and dictionary_learning went
to a direct parameterization for that reason). saetron keeps the paper's log parameterization and
starts the thresholds at their scale instead. The first `jumprelu_start_batches` training forwards
(`start_batches` counts them) are BatchTopK ones: the batch's B*k largest pre-activations, ReLU, no L0
penalty, so that L0 = k while the encoder's scale settles (right after the initialization the encoder
can change the pre-activations' scale by several times lr per step, faster than log-thresholds follow;
measured with --target_l0 8 on a synthetic store at lr 1e-2 from the Kaiming initialization: a JumpReLU
that starts after one batch falls to L0 0.7 within 40 steps and needs ~350 steps to come back, one that
starts after 50 stays within 10% of 8 from step ~140 on). Each of them sets s to the batch's smallest positive
selected pre-activation (averaged over the ranks), so the thresholds start at L0 ~ k; eps follows s, so
the estimator does not depend on the activations' scale. Before the first training batch s = 0
(theta = 0: inference is a plain ReLU).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from saetron.kernels.selection import BatchTopK, Selection, SelectionRule, Threshold
from saetron.kernels.sparse_code import SparseCode

from .base import Architecture, LossInputs, check_k
from .batchtopk import smallest_positive
from .registry import register


def _forget_host_copies(module, _) -> None:
    """After a state-dict load: the host copies of the buffers are stale."""
    module._scale = None
    module._started = None


def rectangle(u: Tensor) -> Tensor:
    """K(u) = 1 on (-1/2, 1/2), else 0 (in u's dtype)."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """(z, theta, eps, to_input) -> z * H(z - theta); z and theta of one shape; the STE of the module
    docstring (its bracketed term to z when to_input)."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float, to_input: bool) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps, ctx.to_input = eps, to_input
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        ste = (theta / ctx.eps) * rectangle((z.to(theta.dtype) - theta) / ctx.eps) * g.to(theta.dtype)
        grad_z = g * (z > theta)
        if ctx.to_input:
            grad_z = grad_z + ste.to(grad_z.dtype)
        return grad_z, -ste, None, None


class StepFunction(torch.autograd.Function):
    """(z, theta, eps, to_input) -> H(z - theta) in z's dtype: the L0 penalty's STE (to z when to_input)."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float, to_input: bool) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps, ctx.to_input = eps, to_input
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        ste = (1.0 / ctx.eps) * rectangle((z.to(theta.dtype) - theta) / ctx.eps) * g.to(theta.dtype)
        return (ste.to(z.dtype) if ctx.to_input else None), -ste, None, None


@register
class JumpReLU(Architecture):
    """Per-latent thresholds theta = s * exp(log_threshold); see the module docstring."""

    name = "jumprelu"
    saelens_name = "jumprelu"
    sparsity_key = "l0_penalty"
    sparsity_in_loss = True
    # --target_l0 (sae/sparsity_control.py): thresholds move by ~lr of themselves a step, so the
    # integral may push faster than ReLU's: at 50, the synthetic test store's L0 8 holds within 4% from
    # step ~100 (at 100 it oscillated by +-25%); on the pilot's 150 JumpReLU steps at a decaying lr 3e-3,
    # 100 lands closer (64 from a start at 1e-4) than 50 (68), 10 barely moves the coefficient.
    target_l0_gain = 50.0
    # the penalty counts active latents (scale-free) against an mse that scales as v: its coefficient
    # starts at l0_coeff * v (measured in sae/sparsity_control.py)
    target_l0_start_power = 1.0

    def __init__(self, cfg, device=None, dtype=None) -> None:
        super().__init__(cfg, device, dtype)
        self.log_threshold = nn.Parameter(torch.zeros(cfg.d_sae, device=device, dtype=dtype))
        self.register_buffer("threshold_scale", torch.zeros((), dtype=torch.float32, device=device))
        self.register_buffer("start_batches", torch.zeros((), dtype=torch.int64, device=device))
        self._scale: float | None = None  # threshold_scale on the host; re-read after a state-dict load
        self._started: int | None = None  # start_batches on the host; likewise
        self.register_load_state_dict_post_hook(_forget_host_copies)
        self.to_input = cfg.jumprelu_ste_to_input

    @classmethod
    def check_config(cls, cfg) -> None:
        check_k(cfg, "the L0 at which its thresholds start, set by its start batches")

    # -- thresholds ----------------------------------------------------------------------------------

    def scale(self) -> float:
        """s on the host (one synchronization after construction or a load, then cached)."""
        if self._scale is None:
            self._scale = float(self.threshold_scale)
        return self._scale

    def bandwidth(self) -> float:
        """eps = jumprelu_bandwidth * s."""
        return self.cfg.jumprelu_bandwidth * self.scale()

    def thresholds(self) -> Tensor:
        """theta [d_sae], differentiable in log_threshold; fp32 at least (bf16 training), fp64 stays."""
        log_threshold = self.log_threshold.to(torch.promote_types(self.log_threshold.dtype, torch.float32))
        return self.threshold_scale * log_threshold.exp()

    def _starting(self) -> bool:
        """Whether this training forward is a start batch (BatchTopK, setting s): one of the first
        jumprelu_start_batches, or a later one while no batch had a positive selection (s = 0)."""
        if not self.training:
            return False
        if self._started is None:
            self._started = int(self.start_batches)
        return self._started < self.cfg.jumprelu_start_batches or self.scale() <= 0

    # -- the forward's hooks -----------------------------------------------------------------------

    def selection_rules(self) -> list[SelectionRule]:
        if self._starting():
            return [BatchTopK(self.cfg.k)]
        margin = self.bandwidth() / 2 if self.training else 0.0
        return [Threshold(self.thresholds().detach(), margin)]

    def activate(self, selections: Sequence[Selection]) -> SparseCode:
        if not self.training or self._starting():
            return super().activate(selections)  # ReLU of the selection (theta >= 0 at inference)
        indices, z, valid = selections[0]
        f = JumpReLUFunction.apply(z, self.thresholds()[indices], self.bandwidth(), self.to_input)  # [B, K]
        return SparseCode(indices, torch.where(valid, f, 0))

    def dense_activation(self, pre: Tensor) -> Tensor:
        if self._starting():
            top = torch.topk(pre.reshape(-1), pre.shape[0] * self.cfg.k).indices  # [B*k]
            return torch.zeros_like(pre).view(-1).scatter(0, top, pre.reshape(-1)[top].relu()).view_as(pre)
        theta = self.thresholds().expand_as(pre)
        if not self.training:
            return pre * (pre > theta)
        return JumpReLUFunction.apply(pre, theta, self.bandwidth(), self.to_input)

    def sparsity_loss(self, inputs: LossInputs) -> Tensor:
        """l0_coeff * mean over tokens of the number of z > theta (with the STE; 0 in the start batches)."""
        if self._starting():
            return inputs.l1.new_zeros(())
        indices, z, valid = inputs.selections[0]
        theta = self.thresholds()[indices]  # [B, K]
        if self.training:
            active = StepFunction.apply(z, theta, self.bandwidth(), self.to_input)
        else:
            active = (z > theta).to(z.dtype)
        return self.cfg.l0_coeff * torch.where(valid, active, 0).sum(-1).mean()

    @torch.no_grad()
    def observe(self, selections: Sequence[Selection], code: SparseCode) -> None:
        if self._starting():
            v, ranks = smallest_positive(selections[0])
            self.threshold_scale.copy_(torch.where(ranks > 0, v, self.threshold_scale.double()))
            self.start_batches += 1
            self._scale = None
            self._started += 1

    # -- export --------------------------------------------------------------------------------------

    def saelens_tensors(self) -> dict[str, Tensor]:
        return {"threshold": self.thresholds().detach()}
