"""The Triton backend's encode (cuBLAS-style addmm chunks + Triton selects + the Triton encoder backward).

What only the Triton backend does: its select kernels' tie rule (lowest column, lowest flat position
first), the capacity-less Threshold's re-emit when the first 256 slots overflow, 16-bit and 32-bit keys
over negative, zero and large values, which gradients its backward builds, and its argument checks.
Every rule against the dense reference on every backend: tests/test_selection.py.

Runs under the Triton interpreter on CPU: TRITON_INTERPRET=1 must be set before triton is first
imported (tests/conftest.py sets it); a CUDA machine runs the compiled kernels (tests/triton_support.py).
The relu/topk codes below are ReLU'd selections (what the relu and topk architectures build), compared
with the fp64 dense oracle on the same selected slots (tolerances: selection_support.GRAD_TOL).
"""

from __future__ import annotations

import pytest
import torch
from selection_support import assert_grads_close, check_selection, dense_choice, grid_inputs
from triton_support import DEVICE

from saetron.kernels.backend import pre_activations
from saetron.kernels.selection import BatchTopK, RowTopK, Threshold
from saetron.kernels.sparse_code import CapacityExceeded
from saetron.kernels.triton_ops import encode


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


def run_code(case, B, d, d_sae, dtype, rule):
    """(selection, relu'd dense code f, grads of sum(f * weight)), and the fp64 oracle's on those slots."""
    x, shift, W_enc, b_enc = make_inputs(case, B, d, d_sae, dtype)
    params = [t.clone().requires_grad_() for t in (shift, W_enc, b_enc)]
    (sel,) = encode(x, *params, [rule])
    check_selection(pre_activations(x, shift, W_enc, b_enc), rule, sel)
    weight = torch.randn(B, d_sae, device=DEVICE).to(dtype).double()  # dL/df, exact in the dtype
    values = torch.where(sel.valid, sel.pre.relu(), 0)  # [B, K]
    f = torch.zeros(B, d_sae, dtype=dtype, device=DEVICE).scatter_add(1, sel.indices, values)
    grads = torch.autograd.grad((f.double() * weight).sum(), params)
    params64 = [t.double().requires_grad_() for t in (shift, W_enc, b_enc)]
    pre64 = pre_activations(x.double(), *params64).gather(1, sel.indices)
    f64 = torch.zeros(B, d_sae, dtype=torch.float64, device=DEVICE).scatter_add(
        1, sel.indices, torch.where(sel.valid, pre64.relu(), 0))
    return sel, f, grads, torch.autograd.grad((f64 * weight).sum(), params64)


# (case, B, d, d_sae, dtype): d=576 (SmolLM2's width), d_sae not a multiple of the interpreter's 128-column
# tile. Both dtypes of every rule on every backend: tests/test_selection.py; here one or two per case.
RELU_CASES = [("random", 16, 576, 64, torch.bfloat16), ("dead_token", 20, 70, 100, torch.float32),
              ("dead_token", 20, 70, 100, torch.bfloat16), ("always_on", 12, 45, 77, torch.float32)]
TOPK_CASES = [  # (case, B, d, d_sae, k): k=1, a power of two, a non power of two, k = d_sae
    ("random", 8, 576, 40, 8),
    ("dead_token", 10, 70, 100, 5),
    ("always_on", 12, 45, 77, 1),
    ("k_all", 6, 33, 24, 24),
]


@pytest.mark.parametrize("case,B,d,d_sae,dtype", RELU_CASES, ids=[f"{c[0]}-{c[4]}" for c in RELU_CASES])
def test_relu_code_matches_reference(case, B, d, d_sae, dtype):
    sel, f, grads, grads64 = run_code(case, B, d, d_sae, dtype, Threshold(0.0, capacity=d_sae))
    assert sel.indices.dtype == torch.int64 and sel.pre.dtype == dtype
    assert sel.pre.shape == (B, d_sae)
    assert_grads_close(grads, grads64, dtype)
    if case == "dead_token":
        assert int((f[0] > 0).sum()) == 0
    if case == "always_on":
        assert bool((f[:, 3] > 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case,B,d,d_sae,k", TOPK_CASES, ids=[c[0] for c in TOPK_CASES])
def test_topk_code_matches_reference(case, B, d, d_sae, k, dtype):
    sel, f, grads, grads64 = run_code(case, B, d, d_sae, dtype, RowTopK(k))
    assert sel.pre.shape == (B, k) and sel.indices.shape == (B, k)
    assert all(len(set(row.tolist())) == k for row in sel.indices), "a row repeats a latent"
    assert_grads_close(grads, grads64, dtype)
    if case == "always_on":
        assert bool((sel.indices[:, 0] == 3).all()), "k=1 must pick the latent active in every token"
    if case == "dead_token":  # picks of all-negative pre-activations: ReLU'd to 0, no gradient
        assert int((f[0] > 0).sum()) == 0


def test_ties_go_to_the_lowest_column_and_position():
    """Many equal pre-activations: RowTopK takes the lowest columns among the ties, BatchTopK the
    lowest flat positions (token-major), so chunked and whole encodes choose alike."""
    B, d, m = 6, 8, 40
    x = torch.zeros(B, d, device=DEVICE)
    shift = torch.zeros(d, device=DEVICE)
    W_enc = torch.zeros(d, m, device=DEVICE)
    b_enc = torch.zeros(m, device=DEVICE)
    b_enc[[5, 30]] = 2.0  # two clear winners, then 38 ties at 0 in every token
    (row, batch) = encode(x, shift, W_enc, b_enc, [RowTopK(5), BatchTopK(4)])
    assert torch.equal(torch.sort(row.indices, 1).values,
                       torch.tensor([[0, 1, 2, 5, 30]] * B, device=DEVICE))
    # 24 = 12 winners + 12 ties, all from token 0 (the lowest flat positions): its lowest tied latents
    chosen = dense_choice(batch, m)
    assert chosen[:, [5, 30]].all() and int(chosen.sum()) == 24
    expected_ties = torch.zeros(B, m, dtype=torch.bool, device=DEVICE)
    expected_ties[0, [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12]] = True
    chosen[:, [5, 30]] = False
    assert torch.equal(chosen, expected_ties)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_keys_order_signs_zeros_and_extremes(dtype):
    """The order-preserving keys: negative, -0/+0, tiny and huge values select like torch.topk."""
    values = torch.tensor([-3e38, -1.0, -1e-30, -0.0, 0.0, 1e-30, 0.5, 1.0, 2.0, 3e38])
    pre = values[torch.randperm(10)].repeat(3, 1)  # [3, 10]: as pre-activations of b_enc alone
    x, shift = torch.zeros(3, 4, device=DEVICE), torch.zeros(4, device=DEVICE)
    W_enc = torch.zeros(4, 10, device=DEVICE)
    (sel,) = encode(x.to(dtype), shift.to(dtype), W_enc.to(dtype), pre[0].to(DEVICE, dtype), [RowTopK(6)])
    expected = torch.topk(pre[0].to(dtype), 6).values.float()  # ... 1e-30, then one of -0/+0
    assert torch.equal(torch.sort(sel.pre.float(), 1, descending=True).values,
                       expected.to(DEVICE).repeat(3, 1))


def test_threshold_capacity_exceeded_reports_the_count():
    x, shift, W_enc, b_enc = make_inputs("random", 16, 40, 64, torch.float32)
    b_enc = torch.full_like(b_enc, 50.0)  # every latent active in every token: 64 per token
    with pytest.raises(CapacityExceeded) as info:
        encode(x, shift, W_enc, b_enc, [Threshold(0.0, capacity=10)])
    assert info.value.max_active == 64 and info.value.capacity == 10


def test_threshold_without_capacity_fits_the_widest_row():
    """capacity=None: the 256-slot first emit overflows (295 active), one exact re-emit, K = 295."""
    x, shift, W_enc, b_enc = make_inputs("random", 4, 16, 300, torch.float32)
    b_enc = torch.full_like(b_enc, 50.0)  # every latent active in every token
    b_enc[:5] = -50.0  # ... but five: the widest row has 295
    (sel,) = encode(x, shift, W_enc, b_enc, [Threshold(0.0)])
    assert sel.pre.shape == (4, 295)
    check_selection(pre_activations(x, shift, W_enc, b_enc), Threshold(0.0), sel)
    sparse = grid_inputs(4, 40, torch.float32)
    (sel,) = encode(*sparse, [Threshold(0.0)])
    assert sel.pre.shape[1] == int((pre_activations(*sparse) > 0).sum(1).max())


def test_backward_computes_only_requested_gradients():
    """Only b_enc requires a gradient: db_enc comes from the batch reduction, nothing else is built."""
    x, shift, W_enc, b_enc = make_inputs("random", 8, 40, 64, torch.float32)
    b = b_enc.clone().requires_grad_()
    (sel,) = encode(x, shift, W_enc, b, [RowTopK(4)])
    weight = torch.randn(8, 4, device=DEVICE)
    (sel.pre * weight).sum().backward()
    expected = torch.zeros(64, device=DEVICE).index_add_(0, sel.indices.reshape(-1), weight.reshape(-1))
    assert shift.grad is None and W_enc.grad is None
    torch.testing.assert_close(b.grad, expected, rtol=1e-6, atol=1e-6)  # fp32 sums of <= 8 terms


def test_encode_rejects_bad_arguments():
    x, shift, W_enc, b_enc = make_inputs("random", 4, 8, 16, torch.float32)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, d_sae=16\]; got 17"):
        encode(x, shift, W_enc, b_enc, [RowTopK(17)])
    with pytest.raises(ValueError, match=r"shift \[8\] and b_enc \[16\]; got \(8,\) and \(15,\)"):
        encode(x, shift, W_enc, b_enc[:15], [Threshold()])
    with pytest.raises(ValueError, match="one float dtype and device.*shift torch.bfloat16"):
        encode(x, shift.bfloat16(), W_enc, b_enc, [Threshold()])
    with pytest.raises(ValueError, match="x: expected a float32/bfloat16/float16 tensor; got torch.float64"):
        encode(*(t.double() for t in (x, shift, W_enc, b_enc)), [Threshold()])
