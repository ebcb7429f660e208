"""Shared support of the architecture tests: a dense oracle of a training step, and the check that the
SparseAutoencoder's one forward matches it on a backend (losses and every gradient).

The oracle restates each architecture's math on the dense pre-activations [B, d_sae] (normalization
`none`, b_dec subtracted from the input, so every parameter has a gradient path), with torch autograd:

    topk       f = ReLU(each token's k largest pre)
    batchtopk  f = ReLU(the batch's B*k largest pre)                         (training)
    jumprelu   f = JumpReLUFunction(pre, theta) (the estimator itself is checked by finite
               differences in test_jumprelu.py); + l0_coeff * mean_b sum_i StepFunction(pre, theta)
    AuxK       (topk, batchtopk, with dead latents) aux_k_coeff * min(n_dead / k_aux, 1) *
               mean((ReLU(top-k_aux dead pre) @ W_dec - (x - recon).detach())^2)
"""

from __future__ import annotations

import torch
from selection_support import ops_for

from saetron.sae import SparseAutoencoder
from saetron.sae.architectures.jumprelu import JumpReLUFunction, StepFunction

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
# Relative to the largest entry of the oracle's tensor. fp64 (reference, torch): the same products summed
# in another order, 1e-10. fp32 (triton, interpreted): sums of <= 60 products in kernel tiles vs one
# addmm/mm, n * eps ~ 4e-6 of the terms, so 1e-4 (as tests/test_backends_model.py).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def backend_dtype(backend: str) -> torch.dtype:
    """fp64 where the backend has it; the Triton selects take fp32 at most."""
    return torch.float32 if backend == "triton" else torch.float64


def make_sae(backend: str, activation: str, k: int | None, d_in: int = 24, d_sae: int = 60, **kw):
    """An SAE on `backend` (skips triton where it cannot run) with nonzero biases, normalization none and
    b_dec subtracted from the input."""
    if backend == "triton":
        ops_for("triton")
    dtype = backend_dtype(backend)
    sae = SparseAutoencoder(d_in, d_sae, "none", True, activation=activation, k=k, backend=backend,
                            dtype=dtype, **kw)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.2)
    return sae


def set_dead(sae, latents) -> None:
    """Mark `latents` dead (their tokens_since_fired at the window)."""
    dead = sae.architecture.dead_latents
    since = torch.zeros_like(dead.tokens_since_fired)
    since[torch.as_tensor(latents, dtype=torch.int64)] = dead.window
    dead.restore(since)


def named_parameters(sae) -> dict[str, torch.Tensor]:
    names = PARAMS + (("architecture.log_threshold",) if sae.cfg.activation == "jumprelu" else ())
    return {name: sae.get_parameter(name) for name in names}


def dense_step(sae, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The oracle's (losses, gradients) of a training forward of `sae` on x [B, d_in] (state before it)."""
    cfg, arch = sae.cfg, sae.architecture
    p = {name: t.detach().clone().requires_grad_() for name, t in named_parameters(sae).items()}
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]  # [B, d_sae]
    B = x.shape[0]
    losses = {}
    if cfg.activation == "topk":
        top, idx = torch.topk(pre, cfg.k, dim=1)
        f = torch.zeros_like(pre).scatter(1, idx, top.relu())
    elif cfg.activation == "batchtopk":
        top, idx = torch.topk(pre.reshape(-1), B * cfg.k)
        f = torch.zeros_like(pre).view(-1).scatter(0, idx, top.relu()).view_as(pre)
    else:  # jumprelu
        theta = arch.threshold_scale * p["architecture.log_threshold"].exp()  # [d_sae] in pre's dtype
        eps = cfg.jumprelu_bandwidth * float(arch.threshold_scale)
        to_input = cfg.jumprelu_ste_to_input
        f = JumpReLUFunction.apply(pre, theta.expand_as(pre), eps, to_input)
        step = StepFunction.apply(pre, theta.expand_as(pre), eps, to_input)
        losses["l0_penalty"] = cfg.l0_coeff * step.sum(1).mean()
    recon = f @ p["W_dec"] + p["b_dec"]
    losses["mse"] = (recon - x).pow(2).mean()
    dead = arch.dead_latents.mask
    if cfg.activation != "jumprelu" and cfg.aux_k_coeff > 0:
        n_dead, k_aux = int(dead.sum()), max(1, min(cfg.d_in // 2, cfg.d_sae))
        aux = torch.zeros((), dtype=torch.float32)
        if n_dead:
            vals, idx = torch.topk(pre.masked_fill(~dead, float("-inf")), min(k_aux, n_dead), dim=1)
            e_hat = torch.zeros_like(pre).scatter(1, idx, vals.relu()) @ p["W_dec"]
            residual = (x - recon).detach()
            aux = cfg.aux_k_coeff * min(n_dead / k_aux, 1.0) * (e_hat - residual).pow(2).mean()
        losses["auxk"] = aux
    total = sum(losses.values())
    total.backward()
    losses["loss"] = total
    losses["l0"] = (f > 0).sum(1).double().mean()
    return ({k: v.detach() for k, v in losses.items()}, {name: t.grad for name, t in p.items()})


def model_step(sae, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The SparseAutoencoder's own training forward and backward: (loss_dict, gradients)."""
    sae.zero_grad(set_to_none=True)
    _, _, losses = sae(x)
    losses["loss"].backward()
    return ({k: v.detach() for k, v in losses.items()},
            {name: t.grad for name, t in named_parameters(sae).items()})


def assert_matches_dense(sae, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's training step on its backend equals the dense oracle; returns the model's losses."""
    expected, expected_grads = dense_step(sae, x)
    losses, grads = model_step(sae, x)
    tol = TOLERANCE[sae.W_enc.dtype]
    for key, value in expected.items():
        assert key in losses, f"{key} missing from {sorted(losses)}"
        torch.testing.assert_close(losses[key].double(), value.double(), rtol=tol, atol=tol * 1e-3, msg=key)
    for name, g in expected_grads.items():
        assert grads[name] is not None, name
        scale = float(g.abs().max()) or 1.0
        torch.testing.assert_close(grads[name], g, rtol=0, atol=tol * scale, msg=f"grad {name}")
    return losses


BACKENDS = ["reference", "torch", "triton"]
