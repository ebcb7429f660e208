"""BatchTopK (sae/architectures/batchtopk.py): the batch-level selection, the inference threshold."""

import pytest
import torch
from arch_support import BACKENDS, assert_matches_dense, make_sae

from saetron.kernels.selection import Threshold
from saetron.sae import SparseAutoencoder
from saetron.sae.architectures.batchtopk import THRESHOLD_DECAY


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_matches_the_dense_form(backend):
    sae = make_sae(backend, "batchtopk", 4)
    x = torch.randn(16, 24, dtype=sae.W_enc.dtype)
    losses = assert_matches_dense(sae, x)
    assert float(losses["auxk"]) == 0.0  # no latent is dead before dead_window tokens


def test_the_batch_shares_k_per_token():
    """B*k selections over the batch, unevenly per token; the largest B*k pre-activations of the batch."""
    sae = SparseAutoencoder(24, 60, "none", activation="batchtopk", k=4, backend="torch")
    with torch.no_grad():
        sae.b_enc.fill_(0.5)  # no non-positive pick: every selection is active
    x = torch.randn(16, 24)
    x[3] *= 4  # a token with larger pre-activations takes more of the batch's selections
    _, features, losses = sae(x)
    per_token = (features.values > 0).sum(1)
    assert int(per_token.sum()) == 16 * 4 and float(losses["l0"]) == 4.0
    assert int(per_token[3]) > 4 and int(per_token.min()) < 4
    with torch.no_grad():
        pre = x @ sae.W_enc + sae.b_enc
    dense = features.to_dense(60)
    assert float(pre[dense > 0].min()) >= float(pre[dense == 0].max())  # the batch's top B*k


def test_threshold_is_the_running_mean_then_ema_of_the_smallest_selection():
    sae = SparseAutoencoder(24, 60, "none", activation="batchtopk", k=4, backend="reference")
    smallest, expected = [], 0.0
    for n in range(1, 131):
        x = torch.randn(8, 24)
        pre = (x @ sae.W_enc + sae.b_enc).detach()
        smallest.append(float(torch.topk(pre.reshape(-1), 8 * 4).values[-1]))
        sae(x)
        expected += max(1 / n, 1 - THRESHOLD_DECAY) * (smallest[-1] - expected)
    assert int(sae.architecture.threshold_batches) == 130
    assert float(sae.architecture.threshold) == pytest.approx(expected, rel=1e-6)  # fp32 buffer
    # a fresh estimate: over its first batches, exactly their mean
    sae3 = SparseAutoencoder(24, 60, "none", activation="batchtopk", k=4, backend="reference")
    sae3.load_state_dict({**sae.state_dict(), "architecture.threshold": torch.tensor(0.0),
                          "architecture.threshold_batches": torch.tensor(0)})
    values = []
    for _ in range(5):
        x = torch.randn(8, 24)
        values.append(float(torch.topk((x @ sae3.W_enc + sae3.b_enc).detach().reshape(-1), 32).values[-1]))
        sae3(x)
    assert float(sae3.architecture.threshold) == pytest.approx(sum(values) / 5, rel=1e-6)


def test_a_batch_without_positive_selection_leaves_the_threshold():
    sae = SparseAutoencoder(24, 60, "none", activation="batchtopk", k=4, backend="reference")
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)
    sae(torch.randn(8, 24))
    assert float(sae.architecture.threshold) == 0.0 and int(sae.architecture.threshold_batches) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_uses_the_threshold(backend):
    sae = make_sae(backend, "batchtopk", 4)
    sae.architecture.threshold.fill_(0.4)
    sae.eval()
    (rule,) = sae.architecture.selection_rules()
    assert isinstance(rule, Threshold) and rule.theta is sae.architecture.threshold
    x = torch.randn(16, 24, dtype=sae.W_enc.dtype)
    _, features, _ = sae(x)
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    dense = features if isinstance(features, torch.Tensor) else features.to_dense(60)
    tol = 1e-4 if sae.W_enc.dtype == torch.float32 else 1e-12  # fp32 kernel tiles vs one addmm
    torch.testing.assert_close(dense.detach(), (pre * (pre > 0.4)).detach(), rtol=0,
                               atol=tol * float(pre.abs().max()))
    torch.testing.assert_close(sae.architecture.dense_activation(pre), pre * (pre > 0.4))
    assert int(sae.architecture.threshold_batches) == 0  # inference does not move it
