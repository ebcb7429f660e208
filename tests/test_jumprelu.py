"""JumpReLU (sae/architectures/jumprelu.py): the straight-through estimator against finite differences of
the smoothed objective, the first batch's thresholds, every backend against the dense form, inference."""

import pytest
import torch
from arch_support import BACKENDS, assert_matches_dense, make_sae

from saetron.kernels.selection import BatchTopK, Threshold
from saetron.sae import SparseAutoencoder
from saetron.sae.architectures.jumprelu import JumpReLUFunction, StepFunction

EPS = 0.3


def smoothed_jumprelu(z, theta, eps):
    """f~(z, theta) = z - int_{-inf}^{theta} (t / eps) K((z - t) / eps) dt: z below the window, 0 above it,
    z - (theta^2 - (z - eps/2)^2) / (2 eps) inside."""
    inside = z - (theta**2 - (z - eps / 2) ** 2) / (2 * eps)
    above = torch.where(theta >= z + eps / 2, torch.zeros_like(z), inside)
    return torch.where(theta <= z - eps / 2, z, above)


def smoothed_step(z, theta, eps):
    """H(z - theta) with H replaced by the rectangle kernel's CDF clamp(u / eps + 1/2, 0, 1)."""
    return ((z - theta) / eps + 0.5).clamp(0, 1)


def smoothed_jump_along_z(z, theta, eps):
    """f with its jump spread along z: (z - theta) H(z - theta) + theta * clamp((z - theta) / eps + 1/2,
    0, 1)."""
    return (z - theta).clamp_min(0) + theta * smoothed_step(z, theta, eps)


def finite_difference(fn, t, h=1e-6):
    """Central differences of the scalar fn w.r.t. each entry of t (fp64)."""
    grad = torch.zeros_like(t)
    for i in range(t.numel()):
        step = torch.zeros_like(t)
        step.view(-1)[i] = h
        grad.view(-1)[i] = (fn(t + step) - fn(t - step)) / (2 * h)
    return grad


def window_inputs():
    """z [64, 12] around per-latent thresholds theta [12], so that many entries fall in each window."""
    theta = torch.rand(12, dtype=torch.float64) + 0.5
    z = theta + (torch.rand(64, 12, dtype=torch.float64) - 0.5) * 4 * EPS
    return z, theta


@pytest.mark.parametrize("to_input", [True, False])
def test_jumprelu_threshold_gradient_is_the_smoothed_objectives(to_input):
    """d/dtheta of sum w * f~(z, theta) by finite differences equals the estimator's theta-gradient; the
    objective is piecewise quadratic in theta, so central differences are exact up to fp64 round-off
    (h = 1e-6, values ~1: ~1e-10), unless a window edge falls within h of theta (probability ~1e-5)."""
    z, theta = window_inputs()
    w = torch.randn_like(z)
    t = theta.clone().requires_grad_()
    f = JumpReLUFunction.apply(z, t.expand_as(z), EPS, to_input)
    (w * f).sum().backward()
    expected = finite_difference(lambda th: (w * smoothed_jumprelu(z, th, EPS)).sum(), theta)
    in_window = ((z - theta).abs() < EPS / 2).sum(0)
    assert bool((in_window > 5).all())  # every latent's gradient is a sum over several tokens
    torch.testing.assert_close(t.grad, expected, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(f, z * (z > theta), rtol=0, atol=0)  # the forward is the exact JumpReLU


@pytest.mark.parametrize("to_input", [True, False])
def test_l0_penalty_threshold_gradient_is_the_smoothed_objectives(to_input):
    z, theta = window_inputs()
    t = theta.clone().requires_grad_()
    step = StepFunction.apply(z, t.expand_as(z), EPS, to_input)
    step.sum().backward()
    expected = finite_difference(lambda th: smoothed_step(z, th, EPS).sum(), theta)
    torch.testing.assert_close(t.grad, expected, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(step, (z > theta).double(), rtol=0, atol=0)


def test_input_gradients_are_the_smoothed_objectives_or_the_step():
    """With the estimator to the input, the z-gradients are the finite differences of the jump spread
    along z and of the penalty's CDF (piecewise linear in z: exact up to round-off, as above); without,
    f's is the step H(z - theta) and the penalty's is 0."""
    z, theta = window_inputs()
    w = torch.randn_like(z)
    for fn, smoothed in ((JumpReLUFunction, smoothed_jump_along_z), (StepFunction, smoothed_step)):
        zz = z.clone().requires_grad_()
        (w * fn.apply(zz, theta.expand_as(z), EPS, True)).sum().backward()
        expected = finite_difference(lambda v, smoothed=smoothed: (w * smoothed(v, theta, EPS)).sum(), z)
        torch.testing.assert_close(zz.grad, expected, rtol=1e-7, atol=1e-7, msg=fn.__name__)
    zz = z.clone().requires_grad_()
    (w * JumpReLUFunction.apply(zz, theta.expand_as(z), EPS, False)).sum().backward()
    torch.testing.assert_close(zz.grad, w * (z > theta))
    zz = z.clone().requires_grad_()
    StepFunction.apply(zz, theta.expand_as(z), EPS, False).sum().backward()
    assert zz.grad is None or not bool(zz.grad.any())


def calibrated(sae, scale: float = 0.5, bandwidth_spread: float = 0.3):
    """An SAE past its first batch: threshold_scale set, per-latent log-thresholds spread."""
    arch = sae.architecture
    state = {**sae.state_dict(), "architecture.threshold_scale": torch.tensor(scale),
             "architecture.start_batches": torch.tensor(sae.cfg.jumprelu_start_batches),
             "architecture.log_threshold": torch.randn(sae.d_sae, dtype=sae.W_enc.dtype) * bandwidth_spread}
    sae.load_state_dict(state)  # (a load: the host copies of the buffers follow)
    assert not arch._starting()
    return sae


@pytest.mark.parametrize("to_input", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_matches_the_dense_form(backend, to_input):
    """Loss (mse + L0 penalty) and every gradient, the thresholds' included: the encode's margin must
    bring every pre-activation of the estimator's window into the selection."""
    sae = calibrated(make_sae(backend, "jumprelu", 4, l0_coeff=0.05, jumprelu_bandwidth=0.5,
                              jumprelu_ste_to_input=to_input))
    x = torch.randn(16, 24, dtype=sae.W_enc.dtype)
    (rule,) = sae.architecture.selection_rules()
    assert isinstance(rule, Threshold) and rule.margin == pytest.approx(0.125)  # eps / 2 = 0.5 * 0.5 / 2
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    theta = sae.architecture.thresholds()
    below = ((pre < theta) & (pre > theta - 0.125)).sum()
    assert int(below) > 5  # pre-activations in the lower half-window: selected with value 0
    losses = assert_matches_dense(sae, x)
    assert float(losses["l0_penalty"]) > 0
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["l0_penalty"])


def test_the_start_batches_set_the_thresholds():
    """The first jumprelu_start_batches training steps are BatchTopK ones; each sets s to its B*k-th
    largest pre-activation; then JumpReLU steps start at theta = s everywhere."""
    sae = SparseAutoencoder(24, 60, "none", activation="jumprelu", k=5, backend="torch",
                            jumprelu_start_batches=2)
    arch = sae.architecture
    assert float(arch.threshold_scale) == 0.0 and isinstance(arch.selection_rules()[0], BatchTopK)
    sae(torch.randn(16, 24))
    assert float(arch.threshold_scale) > 0 and isinstance(arch.selection_rules()[0], BatchTopK)
    x = torch.randn(16, 24)
    _, features, losses = sae(x)
    assert float(losses["l0"]) == 5.0 and float(losses["l0_penalty"]) == 0.0  # a BatchTopK step
    assert int(arch.start_batches) == 2 and isinstance(arch.selection_rules()[0], Threshold)
    with torch.no_grad():
        pre = x @ sae.W_enc + sae.b_enc
    s = float(torch.topk(pre.reshape(-1), 16 * 5).values[-1])
    assert s > 0 and float(arch.threshold_scale) == pytest.approx(s, rel=1e-6)
    torch.testing.assert_close(arch.thresholds(), torch.full((60,), s), rtol=1e-6, atol=0)
    assert arch.bandwidth() == pytest.approx(0.1 * s, rel=1e-6)  # jumprelu_bandwidth's default 0.1
    with torch.no_grad():
        _, _, losses = sae(x)  # now a JumpReLU step at theta = s: all of the B*k but s itself
    assert float(losses["l0"]) == pytest.approx(5 - 1 / 16)
    assert float(losses["l0_penalty"]) == pytest.approx(1e-3 * (5 - 1 / 16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_is_relu_above_the_thresholds(backend):
    sae = calibrated(make_sae(backend, "jumprelu", 4)).eval()
    (rule,) = sae.architecture.selection_rules()
    assert isinstance(rule, Threshold) and rule.margin == 0.0
    x = torch.randn(16, 24, dtype=sae.W_enc.dtype)
    _, features, losses = sae(x)
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        expected = pre * (pre > sae.architecture.thresholds())
    dense = features if isinstance(features, torch.Tensor) else features.to_dense(60)
    tol = 1e-4 if sae.W_enc.dtype == torch.float32 else 1e-12  # fp32 kernel tiles vs one addmm
    torch.testing.assert_close(dense.detach(), expected.to(dense.dtype), rtol=0,
                               atol=tol * float(pre.abs().max()))
    assert float(losses["l0_penalty"]) == pytest.approx(sae.cfg.l0_coeff * float(losses["l0"]))


def test_the_host_copies_follow_a_load():
    sae = calibrated(SparseAutoencoder(24, 60, "none", activation="jumprelu", k=4, backend="reference"), 0.5)
    assert sae.architecture.scale() == 0.5 and not sae.architecture._starting()
    state = dict(sae.state_dict())
    state["architecture.threshold_scale"] = torch.tensor(2.0)
    state["architecture.start_batches"] = torch.tensor(3)
    sae.load_state_dict(state)
    assert sae.architecture.scale() == 2.0 and sae.architecture.bandwidth() == pytest.approx(0.2)
    assert sae.architecture._starting()  # 3 of 50 start batches done


def test_start_batches_continue_until_one_has_a_positive_selection():
    sae = SparseAutoencoder(24, 60, "none", activation="jumprelu", k=4, backend="torch",
                            jumprelu_start_batches=1)
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)  # no positive pre-activation: s cannot be set
    for _ in range(2):
        sae(torch.randn(8, 24))
    arch = sae.architecture
    assert int(arch.start_batches) == 2 and float(arch.threshold_scale) == 0.0
    assert isinstance(arch.selection_rules()[0], BatchTopK)  # no JumpReLU step with eps = 0
