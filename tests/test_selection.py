"""Every selection rule on every backend (reference, torch, triton) against the dense pre-activations.

The rules of kernels/selection.py: RowTopK (with and without a latent mask), Threshold (scalar, and a
per-latent theta with a margin), BatchTopK; their forward (which entries, their exact values, exact
counts with ties), their gradients w.r.t. shift, W_enc, b_enc, chunking, several rules in one encode,
capacities. The triton backend runs under the interpreter on CPU (tests/conftest.py).

Inputs are on grids (tests/selection_support.py): every backend and chunking computes bit-identical
pre-activations, so the selections are checked exactly, ties included.
"""

from __future__ import annotations

import pytest
import torch
from selection_support import (
    BACKENDS,
    DEVICE,
    DTYPES,
    assert_grads_close,
    check_selection,
    dead_mask,
    dense_choice,
    encode_one,
    grid_inputs,
    ops_for,
)

from saetron.kernels.backend import pre_activations
from saetron.kernels.dispatch import backend_ops
from saetron.kernels.reference import select_mask_ref
from saetron.kernels.selection import BatchTopK, RowTopK, Threshold
from saetron.kernels.sparse_code import CapacityExceeded

# -- forward -------------------------------------------------------------------------------------

ROW_CASES = {"k7": (16, 150, 7), "k1": (9, 100, 1), "k_all": (9, 100, 100), "masked": (16, 150, 7)}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", ROW_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_row_topk(backend, case, dtype):
    B, m, k = ROW_CASES[case]
    inputs = grid_inputs(B, m, dtype)
    rule = RowTopK(k, dead_mask(m) if case == "masked" else None)
    sel = encode_one(backend, inputs, rule)
    check_selection(pre_activations(*inputs), rule, sel)
    if case == "masked":  # 5 candidates for k = 7: two invalid slots per token
        assert bool((sel.valid.sum(1) == 5).all())


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", ["relu", "theta_vector_margin"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold(backend, case, dtype):
    inputs = grid_inputs(16, 150, dtype)
    if case == "relu":
        rule = Threshold(0.0)
    else:  # per-latent thresholds, and pre-activations down to 0.5 below them (a JumpReLU's STE band)
        rule = Threshold((torch.randint(0, 64, (150,)) / 8.0).to(DEVICE), margin=0.5)
    sel = encode_one(backend, inputs, rule)
    chosen = check_selection(pre_activations(*inputs), rule, sel)
    assert sel.indices.shape[1] == int(chosen.sum(1).max())  # no capacity: K = the widest token
    if case == "relu":
        assert not bool(chosen[0].any()), "token 0 has no positive pre-activation"


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_topk(backend, dtype):
    inputs = grid_inputs(16, 150, dtype)
    rule = BatchTopK(3)
    sel = encode_one(backend, inputs, rule)
    chosen = check_selection(pre_activations(*inputs), rule, sel)
    counts = chosen.sum(1)
    assert int(counts[0]) == 0, "token 0 (all negative) gets nothing in the batch's top 72"
    assert int(counts.max()) > 3 and sel.indices.shape[1] == int(counts.max())  # widths vary per token


@pytest.mark.parametrize("rule_name", ["row", "threshold", "batch"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_chunks_select_as_one(backend, rule_name):
    """chunk_rows=5 over 16 tokens (4 chunks, the last partial) selects what one chunk selects."""
    inputs = grid_inputs(16, 150, torch.bfloat16)
    rule = {"row": RowTopK(7), "threshold": Threshold(0.0), "batch": BatchTopK(3)}[rule_name]
    pre = pre_activations(*inputs)
    whole = encode_one(backend, inputs, rule)
    chunked = encode_one(backend, inputs, rule, chunk_rows=5)
    check_selection(pre, rule, chunked)
    # the same values per token (BatchTopK: over the batch); ties may pick other latents of equal value
    values = lambda s: torch.sort(torch.where(s.valid, s.pre.float(), float("-inf")), 1).values
    if rule_name == "batch":
        values = lambda s: torch.sort(s.pre[s.valid].float()).values
    assert torch.equal(values(whole), values(chunked))
    if backend == "triton":  # ties are broken by position, so the choice itself is the same
        assert torch.equal(dense_choice(whole, 150), dense_choice(chunked, 150))


# -- gradients -------------------------------------------------------------------------------------

GRAD_RULES = {"row_masked": lambda m: RowTopK(7, dead_mask(m)), "threshold": lambda m: Threshold(0.0),
              "batch": lambda m: BatchTopK(3)}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("rule_name", GRAD_RULES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients(backend, rule_name, dtype):
    """d/d(shift, W_enc, b_enc) of sum(pre * w) over the selected slots, against fp64 autograd of the dense
    pre-activations on the same slots. Continuous inputs (no ties), 100 latents in 2 chunks."""
    if backend == "reference" and dtype == torch.bfloat16:
        pytest.skip("the reference's dense bf16 backward rounds the [B, d] input gradient before the batch "
                    "sum: it is the fp32/fp64 oracle, not a bf16 path")
    B, d, m = 16, 24, 100
    params = [0.1 * torch.randn(d), torch.randn(d, m) / d**0.5, -(torch.randn(m) * 0.5).abs() - 0.1]
    x = torch.randn(B, d)
    x[0] = params[0]  # token 0's pre-activations are b_enc < 0: no ReLU latent, none of the batch's top
    x = x.to(DEVICE, dtype)
    params = [p.to(DEVICE, dtype).requires_grad_() for p in params]
    rule = GRAD_RULES[rule_name](m)
    (sel,) = ops_for(backend).encode(x, *params, [rule], chunk_rows=9)
    w = torch.randn(sel.pre.shape, device=DEVICE).to(dtype).float()  # dL/dpre, exact in the dtype
    grads = torch.autograd.grad((sel.pre.float() * w).sum(), params)

    params64 = [p.detach().double().requires_grad_() for p in params]
    pre64 = pre_activations(x.double(), *params64)  # [B, m]
    loss64 = (torch.where(sel.valid, pre64.gather(1, sel.indices), 0) * w.double()).sum()
    assert_grads_close(grads, torch.autograd.grad(loss64, params64), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_rules_share_one_encode(backend):
    """[BatchTopK, masked RowTopK] in one call: each as alone, and the gradients add up."""
    inputs = grid_inputs(8, 64, torch.float32)  # small: the interpreted backward runs 3 times
    mask = dead_mask(64)
    rules = [BatchTopK(3), RowTopK(4, mask)]
    params = [t.clone().requires_grad_() for t in inputs[1:]]
    both = ops_for(backend).encode(inputs[0], *params, rules)
    for rule, sel in zip(rules, both):
        alone = encode_one(backend, inputs, rule)
        assert torch.equal(dense_choice(sel, 64), dense_choice(alone, 64))
    (both[0].pre.sum() + 2 * both[1].pre.sum()).backward()
    expected = [torch.zeros_like(p) for p in params]
    for rule, scale in zip(rules, (1.0, 2.0)):
        ps = [t.clone().requires_grad_() for t in inputs[1:]]
        (sel,) = ops_for(backend).encode(inputs[0], *ps, [rule])
        for e, g in zip(expected, torch.autograd.grad(scale * sel.pre.sum(), ps)):
            e += g
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))  # fp32 reordering


# -- capacities and errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity(backend):
    inputs = grid_inputs(16, 150, torch.float32)
    widest = int(select_mask_ref(pre_activations(*inputs), Threshold(0.0)).sum(1).max())
    sel = encode_one(backend, inputs, Threshold(0.0, capacity=widest + 3))
    assert sel.indices.shape == (16, widest + 3)
    check_selection(pre_activations(*inputs), Threshold(0.0), sel)
    with pytest.raises(CapacityExceeded) as err:
        encode_one(backend, inputs, Threshold(0.0, capacity=widest - 1))
    assert err.value.max_active == widest and err.value.capacity == widest - 1
    with pytest.raises(CapacityExceeded):
        encode_one(backend, inputs, BatchTopK(3, capacity=3))  # some token takes more than 3 of 48


@pytest.mark.parametrize(
    "rule, pattern",
    [
        (RowTopK(0), r"rule 0 \(RowTopK\): k must be an int in \[1, d_sae=30\]; got 0"),
        (BatchTopK(31), r"k must be an int in \[1, d_sae=30\]; got 31"),
        (RowTopK(3, torch.ones(29, dtype=torch.bool)),
         r"mask must be a bool tensor \[30\]; got torch.bool \(29,\)"),
        (Threshold(torch.zeros(7)), r"theta must be a float tensor \[\] or \[30\]"),
        (Threshold(0.0, margin=-1.0), r"margin must be a finite float >= 0; got -1.0"),
        (Threshold(0.0, capacity=0), r"capacity must be a positive int or None; got 0"),
        ("topk", r"expected RowTopK, Threshold or BatchTopK; got str"),
    ],
)
def test_bad_rules_are_refused(rule, pattern):
    x, shift, W_enc, b_enc = (t.cpu() for t in grid_inputs(4, 30, torch.float32))
    with pytest.raises(ValueError, match=pattern):
        backend_ops("torch").encode(x, shift, W_enc, b_enc, [rule])
