"""SAEAdam against the steps it replaces: projection, clipping, torch.optim.Adam, renormalization.

The oracle, step by step on a copy of the same model and gradients: reference.remove_parallel_grad_ref
on W_dec.grad, torch.nn.utils.clip_grad_norm_, torch.optim.Adam.step, reference.normalize_rows_ref.
Both backends: `torch` (torch ops) and `triton` (the kernels of kernels/triton_adam.py, under the
Triton interpreter on CPU, compiled on a GPU, where the models live on the GPU).

Tolerances. fp32: the two sides differ only in the order of the row reductions (<G_i, W_i>,
||W_i||^2, the norms): n * eps = 576 * 6e-8 = 3.5e-5 relative in the worst case, ~1e-6 in
practice; Adam passes a relative change of g through unchanged where |c g| >> eps = 1e-8 (the
gradients here are O(1) and the clip factor c ~0.5: a factor 0.002 put some elements at |c g| ~ eps,
where g / (|g| + eps) turns a 1e-8 rounding of g into a 1e-5 change of the weight), so parameters and
states agree to rtol 1e-5, atol 1e-6 (entries are O(0.1); the reductions' rounding moves them by
~1e-7) over 3 steps.
bf16 storage: torch rounds to bf16 after every op (lerp, mul, addcmul, the update), the kernels once
at the end, so values differ by a few bf16 ulps (2^-8 relative): rtol = 2^-6, atol = 2^-6 x the
largest entry.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from triton_support import DEVICE

from saetron.kernels.reference import normalize_rows_ref, remove_parallel_grad_ref
from saetron.sae import SparseAutoencoder
from saetron.sae.optim import SAEAdam

LR = 1e-2
BACKENDS = ["torch", "triton"]


def _model(d_in: int, d_sae: int, dtype: torch.dtype) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(d_in, d_sae, "none", activation="topk", k=4, dtype=dtype, device=DEVICE)
    with torch.no_grad():
        sae.W_dec[1].zero_()  # a zero decoder row: its gradient is used unprojected (no direction)
        sae.b_enc.normal_()
    return sae


def _set_grads(sae: SparseAutoencoder, step: int) -> None:
    """O(1) gradients, W_dec's with a real component along each row (what the projection removes)."""
    g = torch.Generator().manual_seed(100 + step)
    for name, p in sae.named_parameters():
        grad = torch.randn(p.shape, generator=g)
        if name == "W_dec":
            grad += 3.0 * p.detach().float().cpu()
        p.grad = grad.to(DEVICE, p.dtype)


def _reference_step(sae: SparseAutoencoder, opt: torch.optim.Adam, max_norm: float) -> torch.Tensor:
    with torch.no_grad():
        sae.W_dec.grad.copy_(remove_parallel_grad_ref(sae.W_dec, sae.W_dec.grad))
    norm = torch.nn.utils.clip_grad_norm_(sae.parameters(), max_norm)
    opt.step()
    with torch.no_grad():
        sae.W_dec.copy_(normalize_rows_ref(sae.W_dec))
    return norm


@pytest.mark.parametrize("max_norm", [100.0, math.inf], ids=["clipped", "unclipped"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_projection_clip_adam_renormalization(backend, max_norm):
    ours = _model(576, 37, torch.float32)  # d=576: a row of 1024 lanes, partly masked
    theirs = copy.deepcopy(ours)
    opt = SAEAdam(ours, lr=LR, backend=backend)
    ref_opt = torch.optim.Adam(theirs.parameters(), lr=LR, foreach=False)
    for step in range(3):
        _set_grads(ours, step)
        _set_grads(theirs, step)
        norm = opt.clip_grad_norm_(max_norm)
        ref_norm = _reference_step(theirs, ref_opt, max_norm)
        opt.step()
        if max_norm == 100.0:
            assert float(ref_norm) > 1.5 * max_norm, "the test must exercise clipping"
        torch.testing.assert_close(norm, ref_norm.float(), rtol=1e-5, atol=0)
        for name, p in ours.named_parameters():
            q = dict(theirs.named_parameters())[name]
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"{name} at step {step}")
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(opt.state[p][key], ref_opt.state[q][key], rtol=1e-5, atol=1e-6,
                                           msg=f"{name}.{key} at step {step}")
            assert float(opt.state[p]["step"]) == step + 1
    rows = ours.W_dec.detach().norm(dim=-1)  # the zero row too, once Adam has moved it
    torch.testing.assert_close(rows, torch.ones_like(rows), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_parameters_match_torch_adam(backend):
    ours = _model(64, 24, torch.bfloat16)
    theirs = copy.deepcopy(ours)
    opt = SAEAdam(ours, lr=LR, backend=backend)
    ref_opt = torch.optim.Adam(theirs.parameters(), lr=LR, foreach=False)
    for step in range(2):
        _set_grads(ours, step)
        _set_grads(theirs, step)
        opt.clip_grad_norm_(1.0)
        _reference_step(theirs, ref_opt, 1.0)
        opt.step()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert p.dtype == torch.bfloat16 and opt.state[p]["exp_avg"].dtype == torch.bfloat16
        scale = float(q.detach().float().abs().max())
        torch.testing.assert_close(p.float(), q.float(), rtol=2**-6, atol=2**-6 * scale, msg=name)


def test_step_without_clip_and_state_layout():
    sae = _model(40, 16, torch.float32)
    before = sae.W_enc.detach().clone()
    opt = SAEAdam(sae, lr=LR, backend="torch")
    _set_grads(sae, 0)
    opt.step()  # no clip_grad_norm_ first: the gradients as they are
    assert not torch.equal(sae.W_enc, before)
    state = opt.state_dict()
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in state["state"].values())
    assert [g["decoder"] for g in state["param_groups"]] == [False, True]
    assert state["param_groups"][1]["params"] == [3]  # W_dec: the last of W_enc, b_enc, W_dec, b_dec


def test_rejects_bad_settings():
    sae = _model(8, 4, torch.float32)
    with pytest.raises(ValueError, match="lr must be > 0"):
        SAEAdam(sae, lr=0.0)
    with pytest.raises(ValueError, match="unknown optimizer backend 'cuda'"):
        SAEAdam(sae, backend="cuda")
    with pytest.raises(ValueError, match="no parameter has a gradient"):
        SAEAdam(sae).clip_grad_norm_(1.0)
