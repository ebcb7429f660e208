"""The latent-sorted row sums (dW_dec, dW_enc, db_enc) and encoder_bwd against the dense reference's autograd.

Runs under the Triton interpreter on CPU (tests/conftest.py), compiled on a GPU. The shapes make the
kernel's program walk several 32-slot chunks that cross latent boundaries (B*K = 768 slots over 3
blocks of 16 latents), with d_sae not a multiple of 16, d = 576 (two 256-column blocks and a
partial one), a latent with no slot, a latent in every token (48 slots: two chunks of its own) and
zero-valued padding slots (which the CSR leaves out).

Tolerances (triton_support.assert_close): the oracle is the reference in fp32 on the same
(bf16-exact) inputs. fp32: the sums run in another order (n * eps = 576 * 6e-8 = 3.5e-5 of the terms'
magnitude): rtol 1e-4. bf16: fp32 accumulation rounded once to bf16 (2^-8 relative): rtol 2^-7.
"""

from __future__ import annotations

import pytest
import torch
from triton_support import DEVICE, assert_close

from saetron.kernels import reference
from saetron.kernels.reference import sparse_decode_ref
from saetron.kernels.selection import RowTopK
from saetron.kernels.sparse_code import SparseCode
from saetron.kernels.triton_encoder_bwd import encoder_bwd
from saetron.kernels.triton_latent_sum import latent_row_sum

HOT, DEAD = 3, 7  # a latent active in every token, a latent never active
CASES = [("chunks", 64, 12, 40, 576), ("hot_and_dead", 48, 5, 37, 70), ("k_all", 6, 24, 24, 40)]
DTYPES = [torch.float32, torch.bfloat16]


def make_code(B: int, K: int, d_sae: int, dtype: torch.dtype) -> SparseCode:
    """[B, K] with distinct latents a row, HOT in every row, DEAD in none (when K < d_sae), and every
    third row ending in a ReLU-style padding slot (index 0, value 0)."""
    allowed = torch.tensor([i for i in range(d_sae) if i not in (HOT, DEAD)] if K < d_sae else
                           [i for i in range(d_sae) if i != HOT])
    picks = [allowed[torch.randperm(len(allowed))[: K - 1]] for _ in range(B)]
    indices = torch.stack([torch.cat([torch.tensor([HOT]), row]) for row in picks])  # [B, K]
    values = torch.rand(B, K) + 0.1
    indices[::3, -1], values[::3, -1] = 0, 0.0
    return SparseCode(indices=indices.to(DEVICE), values=values.to(DEVICE, dtype))


@pytest.mark.parametrize("transposed", [False, True], ids=["row_major", "transposed_out"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case,B,K,d_sae,d", CASES, ids=[c[0] for c in CASES])
def test_decoder_weight_gradient_matches_reference(case, B, K, d_sae, d, dtype, transposed):
    code = make_code(B, K, d_sae, dtype)
    g = torch.randn(B, d).to(DEVICE, dtype)
    W32 = torch.randn(d_sae, d, device=DEVICE).requires_grad_()
    sparse_decode_ref(SparseCode(code.indices, code.values.float()), W32, torch.zeros(d, device=DEVICE)) \
        .backward(g.float())
    out = torch.empty(d, d_sae, dtype=dtype, device=DEVICE).t() if transposed else \
        torch.full((d_sae, d), float("nan"), dtype=dtype, device=DEVICE)
    if transposed:
        out.fill_(float("nan"))  # every element must be written, the empty latent's zeros too
    colsum = torch.full((d_sae,), float("nan"), device=DEVICE)
    latent_row_sum(g, code.indices, code.values, d_sae, out, colsum=colsum)
    assert_close(out, W32.grad, dtype)
    assert torch.equal(out[DEAD].float(), torch.zeros(d, device=DEVICE)) or K == d_sae
    expected_colsum = torch.zeros(d_sae, device=DEVICE).index_add_(
        0, code.indices.reshape(-1), code.values.float().reshape(-1))
    assert_close(colsum, expected_colsum, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case,B,K,d_sae,d", CASES[:2], ids=[c[0] for c in CASES[:2]])
def test_encoder_backward_matches_reference(case, B, K, d_sae, d, dtype):
    x = (torch.randint(-16, 17, (B, d)) / 8.0).to(DEVICE, dtype)  # x - shift exact in bf16
    shift = (torch.randint(-16, 17, (d,)) / 8.0).to(DEVICE, dtype)
    W_enc = (torch.randn(d, d_sae) / d**0.5).to(DEVICE, dtype)
    b_enc = torch.randn(d_sae)
    b_enc[HOT], b_enc[DEAD] = 100.0, -100.0  # HOT in every token's top k, DEAD in none
    b_enc = b_enc.to(DEVICE, dtype)
    ref = [t.float().requires_grad_() for t in (shift, W_enc, b_enc)]
    (sel,) = reference.encode(x.float(), *ref, [RowTopK(K)])  # dense GEMM, top-K per token, autograd
    values = torch.where(sel.valid, sel.pre.relu(), 0.0)  # [B, K]
    code = SparseCode(sel.indices, values.detach())
    upstream = torch.randn(B, K, device=DEVICE)
    values.backward(upstream)

    dpre = (upstream * (code.values > 0)).to(dtype)  # [B, K]: the ReLU mask of the picks
    dshift, dW_enc, db_enc = encoder_bwd(x, shift, W_enc, code.indices, dpre)
    assert dW_enc.shape == (d, d_sae) and dW_enc.is_contiguous(), "dW_enc in W_enc's layout"
    assert dW_enc.dtype == dtype and db_enc.dtype == dtype and dshift.dtype == dtype
    assert_close(dW_enc, ref[1].grad, dtype)
    assert_close(db_enc, ref[2].grad, dtype)
    assert_close(dshift, ref[0].grad, dtype)
    assert torch.equal(dW_enc[:, DEAD].float(), torch.zeros(d, device=DEVICE))


def test_rejects_mixed_dtypes():
    code = make_code(4, 3, 10, torch.float32)
    with pytest.raises(ValueError, match="weights: expected dtype torch.bfloat16"):
        latent_row_sum(torch.randn(4, 8, device=DEVICE, dtype=torch.bfloat16), code.indices, code.values, 10,
                       torch.empty(10, 8, device=DEVICE))
