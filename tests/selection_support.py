"""Shared helpers of the selection tests: backends by name, grid inputs, the tie-aware selection check.

Grid inputs (x, shift multiples of 1/8, W_enc of 1/64, b_enc of 1/8, d = 40): every product and partial
sum of pre = (x - shift) @ W_enc + b_enc is exact in fp32, so every backend and every chunking computes
bit-identical pre-activations (bf16: the same exact sum rounded once), and selections can be checked
exactly, ties included (bf16's 8-bit mantissa makes many).
"""

from __future__ import annotations

import pytest
import torch

from saetron.kernels import dispatch
from saetron.kernels.dispatch import backend_ops
from saetron.kernels.reference import select_mask_ref
from saetron.kernels.selection import RowTopK, Selection, Threshold

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "torch", "triton"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Gradients against an fp64 oracle on the same selection, relative to the largest |expected| entry:
# fp32: summation order only, sums of <= 300 terms: n * eps = 300 * 6e-8 = 1.8e-5, so 1e-4.
# bf16: fp32 accumulation rounded once to bf16 (2^-8 relative): two ulps, 2^-7.
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2.0**-7}


def assert_grads_close(grads, grads64, dtype, names=("shift", "W_enc", "b_enc")) -> None:
    """Each gradient within GRAD_TOL[dtype] x its largest |expected| entry of the fp64 oracle's."""
    for name, g, g64 in zip(names, grads, grads64):
        assert g.dtype == dtype and g.shape == g64.shape, name
        scale = float(g64.abs().max()) or 1.0
        torch.testing.assert_close(g.double(), g64, rtol=0, atol=GRAD_TOL[dtype] * scale, msg=name)


def ops_for(name: str):
    if name == "triton":
        if dispatch.triton_ops() is None:
            pytest.skip("saetron.kernels.triton_ops does not import here")
        from saetron.kernels.triton_common import interpreting

        if DEVICE == "cpu" and not interpreting():
            pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: cannot interpret on CPU")
    return backend_ops(name)


def grid_inputs(B: int, m: int, dtype: torch.dtype, dead_row: bool = True, d: int = 40):
    """x [B, d], shift [d], W_enc [d, m], b_enc [m] on grids (see the module docstring). With dead_row,
    x[0] = shift and b_enc < 0: token 0's pre-activations are all negative."""
    x = torch.randint(-32, 33, (B, d)) / 8.0
    shift = torch.randint(-8, 9, (d,)) / 8.0
    W_enc = torch.randint(-64, 65, (d, m)) / 64.0
    b_enc = torch.randint(-16, 17, (m,)) / 8.0
    if dead_row:
        x[0] = shift
        b_enc = -b_enc.abs() - 0.125
    return [t.to(DEVICE, dtype) for t in (x, shift, W_enc, b_enc)]


def dense_choice(sel: Selection, m: int) -> torch.Tensor:
    """bool [B, m]: the (token, latent) pairs a Selection holds."""
    chosen = torch.zeros(sel.indices.shape[0], m, dtype=torch.bool, device=sel.indices.device)
    rows = torch.arange(sel.indices.shape[0], device=sel.indices.device)[:, None].expand_as(sel.indices)
    chosen[rows[sel.valid], sel.indices[sel.valid]] = True
    return chosen


def check_selection(pre: torch.Tensor, rule, sel: Selection) -> torch.Tensor:
    """Assert sel is a correct selection of `rule` from pre [B, m] (any tie choice); return its dense form."""
    B, m = pre.shape
    assert sel.indices.dtype == torch.int64 and sel.valid.dtype == torch.bool and sel.pre.dtype == pre.dtype
    assert sel.indices.shape == sel.pre.shape == sel.valid.shape and sel.indices.shape[0] == B
    assert not bool(sel.pre[~sel.valid].any()), "padding must hold pre 0"
    assert torch.equal(sel.pre[sel.valid], pre.gather(1, sel.indices)[sel.valid]), "values are not pre's"
    chosen = dense_choice(sel, m)
    assert int(chosen.sum()) == int(sel.valid.sum()), "a latent is selected twice in a token"
    if isinstance(rule, Threshold):
        assert torch.equal(chosen, select_mask_ref(pre, rule))
        return chosen
    inf = torch.tensor(float("inf"), dtype=pre.dtype, device=pre.device)
    if isinstance(rule, RowTopK):
        candidates = torch.ones(m, dtype=torch.bool, device=pre.device) if rule.mask is None else rule.mask
        assert sel.indices.shape[1] == rule.k
        assert bool((chosen.sum(1) == min(rule.k, int(candidates.sum()))).all()), "not exactly k per token"
        assert not bool((chosen & ~candidates).any()), "a latent outside the mask"
        lowest_in = torch.where(chosen, pre, inf).amin(1)
        highest_out = torch.where(candidates & ~chosen, pre, -inf).amax(1)
        assert bool((lowest_in >= highest_out).all()), "a larger candidate was left out"
    else:
        assert int(chosen.sum()) == B * rule.k, "not exactly B*k over the batch"
        assert torch.where(chosen, pre, inf).min() >= torch.where(~chosen, pre, -inf).max()
    return chosen


def encode_one(backend: str, inputs, rule, **kw) -> Selection:
    (sel,) = ops_for(backend).encode(*inputs, [rule], **kw)
    return sel


def dead_mask(m: int) -> torch.Tensor:
    """A latent mask of 5 of m latents (AuxK's dead latents, say); fewer than k=7 of RowTopK."""
    mask = torch.zeros(m, dtype=torch.bool, device=DEVICE)
    mask[torch.randperm(m)[:5]] = True
    return mask
