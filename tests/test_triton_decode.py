"""Sparse decode Triton kernels (forward, dvalues, dW_dec sorted and atomic, dbias) vs sparse_decode_ref.

Runs under the Triton interpreter on CPU: TRITON_INTERPRET=1 must be set before triton is first
imported (triton builds its language interpreted or compiled at import): tests/conftest.py sets it;
a CUDA machine runs the compiled kernels instead (tests/triton_support.py). Shapes stay small:
each interpreted program instance costs ~10 ms.

Tolerances. The oracle is the reference in fp32 on the same inputs (bf16 inputs upcast exactly).
  fp32: only the summation order differs; worst case n * eps = 576 * 6e-8 = 3.4e-5 of the terms'
        magnitude, so rtol = 1e-4 and atol = 1e-4 x the largest |expected|.
  bf16: the kernels accumulate in fp32 and round once to bf16 (2^-8 relative), so two bf16 ulps:
        rtol = 2^-7, atol = 2^-7 x the largest |expected| (cancellation makes small entries
        meaningless elementwise; their error scales with the largest term).
"""

from __future__ import annotations

import pytest
import torch
from triton_support import DEVICE, assert_close

from saetron.kernels.reference import sparse_decode_ref
from saetron.kernels.sparse_code import SparseCode
from saetron.kernels.triton_decode import decode


def make_code(case: str, B: int, K: int, d_sae: int, dtype: torch.dtype) -> SparseCode:
    """A SparseCode [B, K] with distinct latents per row and the case's special structure."""
    indices = torch.stack([torch.randperm(d_sae)[:K] for _ in range(B)])  # [B, K]
    values = torch.rand(B, K) + 0.1
    if case == "dead_token":  # token 0 has no active latent (all padding), token 1 half padding
        values[0] = 0.0
        values[1, K // 2:] = 0.0
    if case == "always_on":  # latent 3 active in every token (one heavy latent for the sorted dW)
        others = torch.tensor([i for i in range(d_sae) if i != 3])
        indices = torch.stack([torch.cat([torch.tensor([3]), others[torch.randperm(d_sae - 1)[: K - 1]]])
                               for _ in range(B)])
    return SparseCode(indices=indices.to(DEVICE), values=values.to(DEVICE, dtype))


# (case, B, K, d_sae, d): d=576 (SmolLM2 width, 3 blocks of 256 with a partial one), d and d_sae not
# multiples of the blocks (BLOCK_D=256, BLOCK_K=16, 32 latents per interpreted program), K=1, K=d_sae.
CASES = [
    ("random", 12, 8, 40, 576),
    ("dead_token", 9, 5, 37, 70),
    ("always_on", 16, 6, 50, 33),
    ("k_one", 7, 1, 19, 45),
    ("k_all", 6, 24, 24, 40),
]


@pytest.mark.parametrize("dw_mode", ["sorted", "atomic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case,B,K,d_sae,d", CASES, ids=[c[0] for c in CASES])
def test_decode_matches_reference(case, B, K, d_sae, d, dtype, dw_mode):
    code = make_code(case, B, K, d_sae, dtype)
    W_dec = torch.randn(d_sae, d).to(DEVICE, dtype)
    bias = torch.randn(d).to(DEVICE, dtype)
    grad = torch.randn(B, d).to(DEVICE, dtype)

    values = code.values.clone().requires_grad_()
    W = W_dec.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    out = decode(code.indices, values, W, b, dw_mode=dw_mode)
    out.backward(grad)

    values32 = code.values.float().requires_grad_()
    W32 = W_dec.float().requires_grad_()
    b32 = bias.float().requires_grad_()
    expected = sparse_decode_ref(SparseCode(code.indices, values32), W32, b32)
    expected.backward(grad.float())

    assert out.dtype == dtype and out.shape == (B, d)
    assert_close(out, expected, dtype)
    assert values.grad.dtype == dtype and W.grad.dtype == dtype
    assert_close(values.grad, values32.grad, dtype)
    assert_close(W.grad, W32.grad, dtype)
    assert_close(b.grad, b32.grad, dtype)
    if case == "dead_token":
        assert torch.equal(out[0].float(), bias.float()), "a token with no active latent decodes to the bias"


def test_decode_skips_gradients_not_needed():
    code = make_code("random", 4, 3, 10, torch.float32)
    W = torch.randn(10, 20, device=DEVICE, requires_grad=True)
    b = torch.randn(20, device=DEVICE)
    decode(code.indices, code.values, W, b).sum().backward()
    assert W.grad is not None and torch.isfinite(W.grad).all()


def test_decode_rejects_bad_shapes_and_dtypes():
    code = make_code("random", 4, 3, 10, torch.float32)
    W = torch.randn(10, 20, device=DEVICE)
    with pytest.raises(ValueError, match=r"bias: expected shape \(20,\)"):
        decode(code.indices, code.values, W, torch.zeros(21, device=DEVICE))
    with pytest.raises(ValueError, match="values: expected dtype torch.float32"):
        decode(code.indices, code.values.bfloat16(), W, torch.zeros(20, device=DEVICE))
    with pytest.raises(ValueError, match="unknown dW_dec mode"):
        decode(code.indices, code.values, W, torch.zeros(20, device=DEVICE), dw_mode="dense")
