"""The torch backend (saetron.kernels.torch_sparse) against the dense references: outputs and gradients.

The code is a Selection activated by ReLU (what the relu and topk architectures do): TopK is RowTopK(k),
ReLU is Threshold(0). The oracle is dense: f = ReLU(pre) where select_mask_ref(pre, rule), 0 elsewhere.
"""

import pytest
import torch

from saetron.kernels import torch_sparse
from saetron.kernels.backend import pre_activations
from saetron.kernels.reference import (
    decode_ref,
    normalize_rows_ref,
    remove_parallel_grad_ref,
    select_mask_ref,
)
from saetron.kernels.selection import RowTopK, Threshold
from saetron.kernels.sparse_code import CapacityExceeded, SparseCode

# Tolerances, relative to the largest entry of the reference tensor:
# fp64: the two sides sum the same products in another order; 1e-10 is ~1e6 ulps of headroom.
# fp32: the same, at 2^-23 per add over up to B = 4096 terms (random-walk growth ~ sqrt(B) * 2^-23
#       ~ 8e-6 relative); 5e-5 leaves room without hiding a wrong gather (errors of order 1).
# bf16: inputs and outputs rounded to 8 bits of mantissa (2^-8 ~ 4e-3 per value); 3e-2.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 5e-5, torch.bfloat16: 3e-2}


def assert_close(actual, expected, dtype, name=""):
    scale = expected.abs().max().item() or 1.0
    tol = TOLERANCE[dtype] * scale
    msg = lambda m: f"{name}: {m}"
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=0, atol=tol, msg=msg)


def make_inputs(B, d, m, dtype, offset=0.5, dead_row=True):
    """Encoder/decoder operands; pre-activations ~ N(-offset, 1) (offset 2.2: ReLU L0 ~ 1.4% of m).

    With dead_row, x[0] equals shift: that token's pre-activation is b_enc < 0 (P(b_enc_i > 0) is
    3e-7 at offset 0.5), so it has no active latent (ReLU) or only zero-valued picks (TopK).
    """
    x = torch.randn(B, d, dtype=torch.float64)
    shift = torch.randn(d, dtype=torch.float64) * 0.1
    if dead_row:
        x[0] = shift
    W_enc = torch.randn(d, m, dtype=torch.float64) / d**0.5
    b_enc = torch.randn(m, dtype=torch.float64) * 0.1 - offset
    W_dec = torch.randn(m, d, dtype=torch.float64) / d**0.5
    bias = torch.randn(d, dtype=torch.float64) * 0.1
    return [t.to(dtype).requires_grad_() for t in (x, shift, W_enc, b_enc, W_dec, bias)]


def rule_of(activation, k=None, capacity=None):
    return RowTopK(k) if activation == "topk" else Threshold(0.0, capacity=capacity)


def encode(x, shift, W_enc, b_enc, activation, k=None, capacity=None) -> SparseCode:
    """The torch backend's code: its selection, ReLU'd (0 at padding)."""
    (sel,) = torch_sparse.encode(x, shift, W_enc, b_enc, [rule_of(activation, k, capacity)])
    return SparseCode(sel.indices, torch.where(sel.valid, sel.pre.relu(), 0))


def encode_dense(x, shift, W_enc, b_enc, activation, k=None):
    """The dense oracle: f = ReLU(pre) at the rule's dense selection, [B, m]."""
    pre = pre_activations(x, shift, W_enc, b_enc)  # [B, m]
    return torch.where(select_mask_ref(pre.detach(), rule_of(activation, k)), pre.relu(), 0)


def run_both(inputs, activation, k):
    """Forward and the gradients of every input on both sides, for one upstream loss.

    loss = <recon, g> + sum_j c[i_j] * values_j (a direct path into the latent values, like the L1 term).
    """
    x, shift, W_enc, b_enc, W_dec, bias = inputs
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(x.shape[0], W_dec.shape[1], generator=gen, dtype=torch.float64).to(x.dtype)
    c = torch.randn(W_enc.shape[1], generator=gen, dtype=torch.float64).to(x.dtype)

    code = encode(x, shift, W_enc, b_enc, activation, k)
    recon = torch_sparse.decode(code, W_dec, bias)
    loss = (recon * g).sum() + (code.values * c[code.indices]).sum()
    grads = torch.autograd.grad(loss, inputs)

    f = encode_dense(x, shift, W_enc, b_enc, activation, k)
    recon_ref = decode_ref(f, W_dec, bias)
    loss_ref = (recon_ref * g).sum() + (f * c).sum()
    grads_ref = torch.autograd.grad(loss_ref, inputs)
    return (code, recon, grads), (f, recon_ref, grads_ref)


def check(ours, ref, dtype, d_sae):
    code, recon, grads = ours
    f, recon_ref, grads_ref = ref
    # pre is the same addmm on both sides (one chunk), so the selection (and its values) is exact
    torch.testing.assert_close(code.to_dense(d_sae), f.detach(), rtol=0, atol=0)
    assert_close(recon, recon_ref, dtype, "recon")
    for name, a, b in zip(("x", "shift", "W_enc", "b_enc", "W_dec", "bias"), grads, grads_ref):
        assert_close(a, b, dtype, f"grad {name}")


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_real_size_fp32(activation):
    """d=576, d_sae=4608, B=4096, k=64 (ReLU at L0 ~64 via a negative b_enc), with a dead token."""
    B, d, m, k = 4096, 576, 4608, 64
    inputs = make_inputs(B, d, m, torch.float32, offset=2.2 if activation == "relu" else 0.5)
    ours, ref = run_both(inputs, activation, k if activation == "topk" else None)
    code = ours[0]
    assert not bool((code.values[0] > 0).any()), "row 0 should have no active latent"
    if activation == "relu":
        l0 = (code.values > 0).sum(-1).float().mean().item()
        assert 30 < l0 < 130, f"the test wants L0 ~64; got {l0}"
        assert code.indices.shape[1] == int((code.values > 0).sum(-1).max())
    check(ours, ref, torch.float32, m)


@pytest.mark.parametrize(
    "B, d, m, k",
    [
        (37, 20, 50, 50),  # k = d_sae
        (16, 24, 100, 1),  # k = 1
        (64, 72, 7168 // 64, 7),  # d_sae = 7168/64, non-powers of two
        (33, 576, 300, 16),
    ],
)
@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_small_shapes_fp64(B, d, m, k, activation):
    inputs = make_inputs(B, d, m, torch.float64, offset=1.0)
    ours, ref = run_both(inputs, activation, k if activation == "topk" else None)
    check(ours, ref, torch.float64, m)


def test_latent_active_in_every_token():
    B, d, m = 40, 24, 60
    x, shift, W_enc, b_enc, W_dec, bias = make_inputs(B, d, m, torch.float64, offset=1.0, dead_row=False)
    with torch.no_grad():
        b_enc[7] = 50.0  # latent 7 fires on every token
    inputs = [x, shift, W_enc, b_enc, W_dec, bias]
    for activation, k in (("relu", None), ("topk", 3)):
        ours, ref = run_both(inputs, activation, k)
        assert bool((ours[0].to_dense(m)[:, 7] > 0).all())
        check(ours, ref, torch.float64, m)


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_bf16_sparse_ops(activation, monkeypatch):
    """torch's sparse products have no bf16: the CSR matmuls upcast to fp32 and cast the gradients back,
    dvalues comes from gathers (in blocks: GATHER_CHUNK_BYTES shrunk to 3 tokens per block here)."""
    inputs = make_inputs(64, 48, 200, torch.bfloat16, offset=1.0)
    monkeypatch.setattr(torch_sparse, "GATHER_CHUNK_BYTES", 3 * 48 * 2 * (8 if activation == "topk" else 30))
    ours, ref = run_both(inputs, activation, 8 if activation == "topk" else None)
    assert ours[1].dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in ours[2])
    check(ours, ref, torch.bfloat16, 200)


def test_sorted_columns_path(monkeypatch):
    """The CUDA path sorts each row's ids before the SDDMM (cuSPARSE wants them sorted): run it on CPU."""
    monkeypatch.setattr(torch_sparse, "_SORTED_COLUMNS_DEVICES", ("cuda", "cpu"))
    inputs = make_inputs(32, 40, 90, torch.float64)
    ours, ref = run_both(inputs, "topk", 9)
    check(ours, ref, torch.float64, 90)


def test_x_gradient():
    """dx = G @ W_enc^T (a row-major CSR matmul), only when x needs a gradient."""
    inputs = make_inputs(48, 30, 80, torch.float64)
    ours, ref = run_both(inputs, "relu", None)
    assert_close(ours[2][0], ref[2][0], torch.float64, "grad x")


def test_decode_padding_repeats_and_zero_values():
    """Padding slots repeat an id (also one the row uses) with value 0: no output, and the value
    gradient is still <g, W_dec[i]> as for the dense code."""
    B, d, m, K = 8, 16, 30, 5
    indices = torch.randint(0, m, (B, K))
    indices[:, 3:] = indices[:, :1]  # repeats of a used id
    values = torch.rand(B, K, dtype=torch.float64)
    values[:, 3:] = 0.0
    values.requires_grad_()
    W_dec = torch.randn(m, d, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(d, dtype=torch.float64, requires_grad=True)
    g = torch.randn(B, d, dtype=torch.float64)
    out = torch_sparse.decode(SparseCode(indices, values), W_dec, bias)
    grads = torch.autograd.grad((out * g).sum(), [values, W_dec, bias])
    out_ref = decode_ref(SparseCode(indices, values).to_dense(m), W_dec, bias)
    grads_ref = torch.autograd.grad((out_ref * g).sum(), [values, W_dec, bias])
    assert_close(out, out_ref, torch.float64, "recon")
    for name, a, b in zip(("values", "W_dec", "bias"), grads, grads_ref):
        assert_close(a, b, torch.float64, name)


def test_relu_capacity():
    x, shift, W_enc, b_enc, _, _ = make_inputs(16, 20, 64, torch.float64)
    widest = int((encode_dense(x, shift, W_enc, b_enc, "relu") > 0).sum(-1).max())
    code = encode(x, shift, W_enc, b_enc, "relu", capacity=widest + 3)
    assert code.indices.shape == (16, widest + 3)
    expected = encode_dense(x, shift, W_enc, b_enc, "relu")
    torch.testing.assert_close(code.to_dense(64), expected, rtol=0, atol=0)
    with pytest.raises(CapacityExceeded) as err:
        encode(x, shift, W_enc, b_enc, "relu", capacity=widest - 1)
    assert err.value.max_active == widest and err.value.capacity == widest - 1


def test_no_active_latent_in_batch():
    """A batch where nothing fires: width 1, all values 0, zero gradients into the encoder."""
    x, shift, W_enc, b_enc, W_dec, bias = make_inputs(8, 12, 20, torch.float64)
    with torch.no_grad():
        b_enc.fill_(-1e3)
    code = encode(x, shift, W_enc, b_enc, "relu")
    assert code.indices.shape == (8, 1) and not bool(code.values.any())
    recon = torch_sparse.decode(code, W_dec, bias)
    grad_W, grad_b = torch.autograd.grad(recon.sum(), [W_enc, b_enc])
    assert not bool(grad_W.any()) and not bool(grad_b.any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_norm_ops(dtype):
    W = torch.randn(300, 576, dtype=dtype)
    W[5] = 0.0  # a zero row: its gradient stays, its norm stays zero
    G = torch.randn(300, 576, dtype=dtype)
    expected = remove_parallel_grad_ref(W, G)
    assert torch_sparse.remove_parallel_grad_(W, G) is G
    assert_close(G, expected, dtype, "remove_parallel_grad_")
    expected = normalize_rows_ref(W)
    assert torch_sparse.normalize_rows_(W) is W
    assert_close(W, expected, dtype, "normalize_rows_")
    assert not bool(W[5].any())


def test_bad_arguments():
    x, shift, W_enc, b_enc = (t.detach() for t in make_inputs(4, 6, 10, torch.float32)[:4])
    with pytest.raises(ValueError, match="non-empty list of selection rules"):
        torch_sparse.encode(x, shift, W_enc, b_enc, [])
    with pytest.raises(ValueError, match=r"k must be an int in \[1, d_sae=10\]; got 11"):
        torch_sparse.encode(x, shift, W_enc, b_enc, [RowTopK(11)])
    with pytest.raises(ValueError, match=r"shift \[6\]"):
        torch_sparse.encode(x, shift[:5], W_enc, b_enc, [Threshold()])
    with pytest.raises(ValueError, match="W_enc"):
        torch_sparse.encode(x[:, :5], shift, W_enc, b_enc, [Threshold()])
    with pytest.raises(ValueError, match="one float dtype and device.*b_enc torch.float64"):
        torch_sparse.encode(x, shift, W_enc, b_enc.double(), [Threshold()])
    with pytest.raises(ValueError, match="int64 indices"):
        indices = torch.zeros(4, 2, dtype=torch.int32)
        torch_sparse.decode(SparseCode(indices, torch.zeros(4, 2)), torch.zeros(10, 6), torch.zeros(6))
