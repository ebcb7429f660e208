"""Fused encode Triton kernel (relu and topk) and its backward (encoder backward) vs encode_ref.

Runs under the Triton interpreter on CPU: TRITON_INTERPRET=1 must be set before triton is first
imported (triton builds its language interpreted or compiled at import): tests/conftest.py sets it;
a CUDA machine runs the compiled kernels (tests/triton_support.py). Shapes stay small (each
interpreted program costs ~10 ms; tl.topk's sort network is the slow part, so topk cases use few row blocks).

Inputs are bf16-exact: x and shift are multiples of 1/8 in [-4, 4], so x - shift is exact in bf16
and in fp32, and the kernel (which rounds x - shift to the input dtype, like the reference) sees the
same operands as the fp32 oracle: encode_ref in fp32 on the upcast inputs. The top-k set can then
only differ at a near-tie of ~1e-6 (fp32 summation order), improbable with random data.

Tolerances (the compared tensors are the dense activations and the gradients of shift, W_enc, b_enc):
  fp32: summation order only; worst case n * eps = 576 * 6e-8 = 3.4e-5 of the terms' magnitude,
        so rtol = 1e-4, atol = 1e-4 x the largest |expected|.
  bf16: fp32 accumulation rounded once to bf16 (2^-8 relative): rtol = 2^-7 (two ulps),
        atol = 2^-7 x the largest |expected| (cancellations scale with the largest term).
"""

from __future__ import annotations

import pytest
import torch
from triton_support import DEVICE, assert_close

from saetron.kernels.reference import encode_ref
from saetron.kernels.sparse_code import CapacityExceeded
from saetron.kernels.triton_encode import encode


def make_inputs(case: str, B: int, d: int, d_sae: int, dtype: torch.dtype):
    """x [B, d], shift [d] on a 1/8 grid (bf16-exact differences), W_enc [d, d_sae], b_enc [d_sae]."""
    x = torch.randint(-32, 33, (B, d)) / 8.0
    shift = torch.randint(-32, 33, (d,)) / 8.0
    W_enc = torch.randn(d, d_sae) / d**0.5
    b_enc = torch.randn(d_sae) * 0.5
    if case == "dead_token":  # token 0: x = shift and b_enc < 0, so every pre of token 0 is negative
        x[0] = shift
        b_enc = -b_enc.abs() - 0.1
    if case == "always_on":  # latent 3 has the largest pre in every token
        b_enc[3] = 100.0
    return [t.to(DEVICE, dtype) for t in (x, shift, W_enc, b_enc)]


def run_both(case, B, d, d_sae, dtype, activation, k=None, capacity=None):
    """(code, dense f, grads) of the kernel and (dense f, grads) of the fp32 reference."""
    x, shift, W_enc, b_enc = make_inputs(case, B, d, d_sae, dtype)
    weight = torch.randn(B, d_sae).to(DEVICE, dtype)  # loss = sum(f * weight): dL/df = weight
    params = [t.clone().requires_grad_() for t in (shift, W_enc, b_enc)]
    code = encode(x, *params, activation, k=k, capacity=capacity)
    f = code.to_dense(d_sae)
    (f * weight).sum().backward()
    params32 = [t.float().requires_grad_() for t in (shift, W_enc, b_enc)]
    f32 = encode_ref(x.float(), *params32, activation, k)
    (f32 * weight.float()).sum().backward()
    return code, f, [p.grad for p in params], f32, [p.grad for p in params32]


# (case, B, d, d_sae): d=576 (SmolLM2's width: 18 K-steps of 32 when interpreted, 9 of 64 on GPU),
# d and d_sae not multiples of the blocks (interpreted BLOCK_B=16, BLOCK_M=32, BLOCK_K=32).
RELU_CASES = [
    ("random", 16, 576, 64),
    ("dead_token", 20, 70, 100),
    ("always_on", 12, 45, 77),
]
TOPK_CASES = [  # (case, B, d, d_sae, k): k=1, a power of two, a non power of two, k = d_sae
    ("random", 8, 576, 40, 8),
    ("dead_token", 10, 70, 100, 5),
    ("always_on", 12, 45, 77, 1),
    ("k_all", 6, 33, 24, 24),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case,B,d,d_sae", RELU_CASES, ids=[c[0] for c in RELU_CASES])
def test_encode_relu_matches_reference(case, B, d, d_sae, dtype):
    code, f, grads, f32, grads32 = run_both(case, B, d, d_sae, dtype, "relu", capacity=d_sae)
    assert code.indices.dtype == torch.int64 and code.values.dtype == dtype
    assert code.values.shape == (B, d_sae)
    assert_close(f, f32, dtype)
    for name, g, g32 in zip(("shift", "W_enc", "b_enc"), grads, grads32):
        assert g.dtype == dtype and g.shape == g32.shape, name
        assert_close(g, g32, dtype)
    if case == "dead_token":
        assert int((code.values[0] > 0).sum()) == 0
    if case == "always_on":
        assert bool(((code.indices == 3) & (code.values > 0)).any(1).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case,B,d,d_sae,k", TOPK_CASES, ids=[c[0] for c in TOPK_CASES])
def test_encode_topk_matches_reference(case, B, d, d_sae, k, dtype):
    code, f, grads, f32, grads32 = run_both(case, B, d, d_sae, dtype, "topk", k=k)
    assert code.values.shape == (B, k) and code.indices.shape == (B, k)
    assert all(len(set(row.tolist())) == k for row in code.indices), "a row repeats a latent"
    assert_close(f, f32, dtype)
    for name, g, g32 in zip(("shift", "W_enc", "b_enc"), grads, grads32):
        assert g.dtype == dtype and g.shape == g32.shape, name
        assert_close(g, g32, dtype)
    if case == "always_on":
        assert bool((code.indices[:, 0] == 3).all()), "k=1 must pick the latent active in every token"


def test_encode_relu_capacity_exceeded_reports_the_count():
    x, shift, W_enc, b_enc = make_inputs("random", 16, 40, 64, torch.float32)
    b_enc = torch.full_like(b_enc, 50.0)  # every latent active in every token: 64 per token
    with pytest.raises(CapacityExceeded) as info:
        encode(x, shift, W_enc, b_enc, "relu", capacity=10)
    assert info.value.max_active == 64 and info.value.capacity == 10


def test_encode_rejects_bad_arguments():
    x, shift, W_enc, b_enc = make_inputs("random", 4, 8, 16, torch.float32)
    with pytest.raises(ValueError, match=r"k in \[1, d_sae=16\]"):
        encode(x, shift, W_enc, b_enc, "topk", k=17)
    with pytest.raises(ValueError, match=r"b_enc: expected shape \(16,\); got \(15,\)"):
        encode(x, shift, W_enc, b_enc[:15], "relu")
    with pytest.raises(ValueError, match="shift: expected dtype torch.float32"):
        encode(x, shift.bfloat16(), W_enc, b_enc, "relu")
    with pytest.raises(ValueError, match="unknown activation"):
        encode(x, shift, W_enc, b_enc, "gelu")


def test_encode_backward_computes_only_requested_gradients():
    """Only b_enc requires a gradient: db_enc comes from the batch reduction, nothing else is built."""
    x, shift, W_enc, b_enc = make_inputs("random", 8, 40, 64, torch.float32)
    b = b_enc.clone().requires_grad_()
    code = encode(x, shift, W_enc, b, "topk", k=4)
    weight = torch.randn(8, 64, device=DEVICE)
    (code.to_dense(64) * weight).sum().backward()
    b32 = b_enc.clone().requires_grad_()
    (encode_ref(x, shift, W_enc, b32, "topk", 4) * weight).sum().backward()
    assert shift.grad is None and W_enc.grad is None
    assert_close(b.grad, b32.grad, torch.float32)


def test_encode_relu_without_capacity_fits_the_widest_row():
    """capacity=None: the 256-slot first pass overflows (300 active), one exact rerun, K = 300."""
    x, shift, W_enc, b_enc = make_inputs("random", 4, 16, 300, torch.float32)
    b_enc = torch.full_like(b_enc, 50.0)  # every latent active in every token
    b_enc[:5] = -50.0  # ... but five: the widest row has 295
    code = encode(x, shift, W_enc, b_enc, "relu")
    assert code.values.shape == (4, 295)
    assert_close(code.to_dense(300), encode_ref(x, shift, W_enc, b_enc, "relu"), torch.float32)
    sparse = make_inputs("random", 4, 16, 40, torch.float32)
    code = encode(*sparse, "relu")
    assert code.values.shape[1] == int((encode_ref(*sparse, "relu") > 0).sum(1).max())
