"""Decoder-norm Triton kernels (remove_parallel_grad_, normalize_rows_) vs their references.

Runs under the Triton interpreter on CPU: TRITON_INTERPRET=1 must be set before triton is first
imported, set by tests/conftest.py; a CUDA machine runs the compiled kernels (tests/triton_support.py).

Tolerances. The oracle is the reference on the same inputs (both compute in fp32).
  fp32: the row dot products and norms are summed in another order: n * eps = 576 * 6e-8 = 3.4e-5
        relative to the row's magnitude, so rtol = atol = 1e-4 (rows are O(1)).
  bf16: both sides compute in fp32 and round once to bf16, so results differ by at most one bf16
        ulp where fp32 ordering moves a value across a rounding boundary: rtol = atol = 2^-7.
"""

from __future__ import annotations

import pytest
import torch
from triton_support import DEVICE

from saetron.kernels.reference import normalize_rows_ref, remove_parallel_grad_ref
from saetron.kernels.triton_decoder_norm import normalize_rows_, remove_parallel_grad_

TOL = {torch.float32: 1e-4, torch.bfloat16: 2.0**-7}
# (d_sae, d): d=576 (two BLOCK_D=512 steps, the second partial), rows not a multiple of BLOCK_M=4.
SHAPES = [(37, 576), (6, 70), (1, 1)]


def make(d_sae: int, d: int, dtype: torch.dtype):
    W = torch.randn(d_sae, d)
    W[0] = 0.0  # a zero row: its gradient is left unchanged and it stays zero when normalized
    G = torch.randn(d_sae, d) + 0.5 * W  # a real parallel component to remove
    return W.to(DEVICE, dtype), G.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d_sae,d", SHAPES)
def test_remove_parallel_grad_matches_reference(d_sae, d, dtype):
    W, G = make(d_sae, d, dtype)
    expected = remove_parallel_grad_ref(W, G)
    G_in = G.clone()
    out = remove_parallel_grad_(W, G_in)
    assert out.data_ptr() == G_in.data_ptr(), "must work in place"
    torch.testing.assert_close(G_in.float(), expected.float(), rtol=TOL[dtype], atol=TOL[dtype])
    assert torch.equal(G_in[0], G[0]), "a zero row of W leaves its gradient unchanged"
    if dtype == torch.float32 and d > 1:  # what the projection is for: rows orthogonal to W
        dots = (G_in * W).sum(-1) / W.norm(dim=-1).clamp_min(1e-12)
        assert float(dots.abs().max()) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d_sae,d", SHAPES)
def test_normalize_rows_matches_reference(d_sae, d, dtype):
    W, _ = make(d_sae, d, dtype)
    W = W * 3.0
    expected = normalize_rows_ref(W)
    out = normalize_rows_(W)
    assert out.data_ptr() == W.data_ptr(), "must work in place"
    torch.testing.assert_close(W.float(), expected.float(), rtol=TOL[dtype], atol=TOL[dtype])
    assert torch.equal(W[0], torch.zeros_like(W[0])), "a zero row stays zero"


def test_strided_rows_and_bad_shapes():
    W, G = make(8, 40, torch.float32)
    big = torch.zeros(8, 64, device=DEVICE)
    big[:, :40] = G
    view = big[:, :40]  # row stride 64: a shard-like view, updated in place
    remove_parallel_grad_(W, view)
    torch.testing.assert_close(big[:, :40], remove_parallel_grad_ref(W, G), rtol=1e-4, atol=1e-4)
    assert torch.equal(big[:, 40:], torch.zeros(8, 24, device=DEVICE)), "columns past d untouched"
    with pytest.raises(ValueError, match=r"W \(8, 40\) on .* and G \(8, 39\)"):
        remove_parallel_grad_(W, G[:, :39])
    with pytest.raises(ValueError, match="expected a 2-D"):
        normalize_rows_(W[0])
