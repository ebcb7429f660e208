"""The reference SparseAutoencoder: init, normalization modes, losses by hand, TopK, decoder norm."""

import math

import pytest
import torch

from saetron.sae import SAEConfig, SparseAutoencoder
from saetron.sae.model import LAYER_NORM_EPS

NORMALIZATIONS = ["expected_average_only_in", "layer_norm", "none"]
# Tests of the oracle's own semantics use backend="reference" (dense features [B, d_sae]); the other
# backends are checked against it in test_backends_model.py.


def test_init_shapes_unit_rows_and_transpose():
    sae = SparseAutoencoder(48, 160)
    assert sae.W_enc.shape == (48, 160) and sae.W_dec.shape == (160, 48)
    assert sae.b_enc.shape == (160,) and sae.b_dec.shape == (48,) and sae.activation_mean.shape == (48,)
    assert all(isinstance(p, torch.nn.Parameter) for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    assert "activation_mean" in dict(sae.named_buffers())
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(160))
    # decoder rows point along the encoder's columns
    cos = torch.nn.functional.cosine_similarity(sae.W_dec, sae.W_enc.t(), dim=1)
    torch.testing.assert_close(cos, torch.ones(160))
    assert sae.b_enc.abs().sum() == 0 and sae.b_dec.abs().sum() == 0
    bound = math.sqrt(6.0 / 48)  # Kaiming-uniform, gain sqrt(2), fan_in = d_in
    assert sae.W_enc.abs().max() <= bound and sae.W_enc.abs().max() > 0.9 * bound


def _identity_sae(d_in, normalize, apply_b_dec, activation="relu", backend="reference"):
    """An SAE that represents every input exactly: W_enc = [I, -I], W_dec = [I; -I], so
    f = [relu(s), relu(-s)] and f @ W_dec = s for s = the encoder's input. With apply_b_dec the
    encoder sees x_n - b_dec and the decoder adds b_dec back, so b_dec may be non-zero; without
    it b_dec must be zero for the identity to hold."""
    k = d_in if activation == "topk" else None  # at most d_in of the 2 d_in latents are positive
    sae = SparseAutoencoder(
        d_in, 2 * d_in, normalize, apply_b_dec, activation=activation, k=k, backend=backend
    )
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        if apply_b_dec:
            sae.b_dec.copy_(torch.linspace(-1, 1, d_in))
        sae.activation_mean.copy_(torch.linspace(2, 5, d_in))
    return sae


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("apply_b_dec", [False, True])
@pytest.mark.parametrize("activation", ["relu", "topk"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_representable_input_is_reconstructed(normalize, apply_b_dec, activation, backend):
    sae = _identity_sae(24, normalize, apply_b_dec, activation, backend)
    x = torch.randn(32, 24) * 3 + 4
    recon, features, losses = sae(x)
    if backend != "reference":
        features = features.to_dense(48)
    if normalize == "layer_norm":
        # SAELens' convention: x_n = (x - mu) / (s + eps), recon = recon_n * s + mu, so an exact
        # recon_n gives recon - x = -(x - mu) * eps / (s + eps): bounded by max|x - mu| * eps / s.
        mu, s = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
        bound = ((x - mu).abs() * LAYER_NORM_EPS / s).max().item()
        assert (recon - x).abs().max().item() <= bound + 1e-5
    else:
        # fp32 round-off on values of size ~10: a few ulps
        torch.testing.assert_close(recon, x, atol=1e-5, rtol=1e-5)
    assert losses["mse"].item() < 1e-10
    assert losses["explained_variance"].item() > 1 - 1e-6
    assert features.shape == (32, 48)


def test_losses_by_hand():
    # d_in = 2, d_sae = 3, no normalization: every number below is computed by hand.
    sae = SparseAutoencoder(2, 3, "none", False, l1_coeff=0.5, backend="reference")
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, 1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, -1.0, 0.0]))
        sae.W_dec.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 4.0]]))  # row norms 2, 1, 5
        sae.b_dec.copy_(torch.tensor([0.1, -0.1]))
    x = torch.tensor([[1.0, 1.0], [2.0, -1.0]])
    # token 0: pre = [1, -1+2-1, 0.5+1] = [1, 0, 1.5] -> f = [1, 0, 1.5]
    # token 1: pre = [2, -2-2-1, 1-1] = [2, -5, 0]    -> f = [2, 0, 0]
    # recon 0 = 1*[2,0] + 1.5*[3,4] + b_dec = [6.6, 5.9];  recon 1 = 2*[2,0] + b_dec = [4.1, -0.1]
    recon, f, losses = sae(x)
    torch.testing.assert_close(f, torch.tensor([[1.0, 0.0, 1.5], [2.0, 0.0, 0.0]]))
    torch.testing.assert_close(recon, torch.tensor([[6.6, 5.9], [4.1, -0.1]]))
    mse = ((6.6 - 1) ** 2 + (5.9 - 1) ** 2 + (4.1 - 2) ** 2 + (-0.1 + 1) ** 2) / 4
    l1 = 0.5 * ((1 * 2 + 1.5 * 5) + (2 * 2)) / 2
    # explained variance: batch mean [1.5, 0]; total = 0.25+1+0.25+1 = 2.5
    ev = 1 - ((5.6**2 + 4.9**2) + (2.1**2 + 0.9**2)) / 2.5
    assert losses["mse"].item() == pytest.approx(mse, rel=1e-6)
    assert losses["l1"].item() == pytest.approx(l1, rel=1e-6)
    assert losses["loss"].item() == pytest.approx(mse + l1, rel=1e-6)
    assert losses["l0"].item() == pytest.approx(1.5)
    assert losses["explained_variance"].item() == pytest.approx(ev, rel=1e-6)
    assert losses["loss"].requires_grad and not losses["l0"].requires_grad


def test_topk_loss_is_mse_and_l1_is_reported():
    sae = SparseAutoencoder(16, 64, activation="topk", k=4, l1_coeff=0.1)
    _, _, losses = sae(torch.randn(8, 16))
    assert losses["loss"].item() == pytest.approx(losses["mse"].item())
    assert losses["l1"].item() > 0


def test_layer_norm_mse_is_in_normalized_space():
    sae = SparseAutoencoder(16, 32, "layer_norm")
    x = torch.randn(10, 16) * 50 + 7
    recon, _, losses = sae(x)
    x_n, stats = sae.normalize(x)
    recon_n = (recon - stats[0]) / stats[1]
    assert losses["mse"].item() == pytest.approx((recon_n - x_n).pow(2).mean().item(), rel=1e-4)


@pytest.mark.parametrize("k", [1, 5, 64])
def test_topk_keeps_exactly_k(k):
    sae = SparseAutoencoder(16, 64, "none", activation="topk", k=k, backend="reference")
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every pre-activation positive: exactly k survive the ReLU
    _, f, losses = sae(torch.randn(12, 16))
    assert ((f > 0).sum(-1) == k).all()
    assert losses["l0"].item() == k


def test_topk_survivors_are_the_largest():
    sae = SparseAutoencoder(8, 40, "none", activation="topk", k=3, backend="reference")
    x = torch.randn(6, 8)
    _, f, _ = sae(x)
    pre = x @ sae.W_enc + sae.b_enc
    top = torch.topk(pre, 3, dim=-1).indices
    expected = torch.zeros_like(pre).scatter(-1, top, pre.gather(-1, top).relu())
    torch.testing.assert_close(f, expected)


def test_remove_parallel_decoder_grad_leaves_orthogonal_gradient():
    sae = SparseAutoencoder(32, 96)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(96, 1) + 0.5)  # rows not at unit norm: the projection must divide
    _, _, losses = sae(torch.randn(64, 32))
    losses["loss"].backward()
    before = sae.W_dec.grad.clone()
    sae.remove_parallel_decoder_grad()
    after = sae.W_dec.grad
    dots = (after * sae.W_dec).sum(-1) / (before.norm(dim=-1) * sae.W_dec.norm(dim=-1) + 1e-12)
    assert dots.abs().max().item() < 1e-6  # cosine of the remainder with its row: fp32 round-off
    # the removed part is parallel to the row: before - after = c_i * W_i
    removed = before - after
    cos = torch.nn.functional.cosine_similarity(removed, sae.W_dec, dim=-1)
    nonzero = removed.norm(dim=-1) > 1e-8
    assert (cos[nonzero].abs() > 1 - 1e-5).all()


def test_normalize_decoder_restores_unit_rows():
    sae = SparseAutoencoder(32, 96)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(96, 1) * 3 + 0.1)
    direction = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=-1, keepdim=True)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(96))
    torch.testing.assert_close(sae.W_dec.detach(), direction)


def test_estimate_activation_mean_is_exact_over_batches():
    sae = SparseAutoencoder(8, 16)
    data = torch.randn(1000, 8, dtype=torch.float64) + 5
    sae.estimate_activation_mean(data.split(300))
    torch.testing.assert_close(sae.activation_mean, data.mean(0).float())
    with pytest.raises(ValueError, match="no rows"):
        sae.estimate_activation_mean([])


def test_centering_is_by_activation_mean():
    sae = SparseAutoencoder(8, 16)
    sae.activation_mean.fill_(3.0)
    x = torch.randn(4, 8)
    x_n, _ = sae.normalize(x)
    torch.testing.assert_close(x_n, x - 3.0)


def test_leading_dims_are_flattened():
    sae = SparseAutoencoder(8, 16, backend="reference")
    recon, f, _ = sae(torch.randn(2, 3, 8))
    assert recon.shape == (6, 8) and f.shape == (6, 16)


def test_apply_b_dec_to_input_changes_the_encoder_input():
    x = torch.randn(5, 8)
    off = SparseAutoencoder(8, 16, "none", False)
    on = SparseAutoencoder(8, 16, "none", True)
    on.load_state_dict(off.state_dict())
    with torch.no_grad():
        off.b_dec.fill_(0.7)
        on.b_dec.fill_(0.7)
    torch.testing.assert_close(on.encode(x), off.encode(x - 0.7))
    assert not torch.equal(on.encode(x), off.encode(x))


# -- bad input -----------------------------------------------------------------------------------


def test_wrong_width_names_both_widths():
    sae = SparseAutoencoder(8, 16)
    with pytest.raises(ValueError, match=r"d_in=8.*\(4, 9\)"):
        sae(torch.randn(4, 9))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_refused(bad):
    sae = SparseAutoencoder(8, 16)
    x = torch.randn(4, 8)
    x[2, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf in 1 of 4 rows"):
        sae(x)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"normalize_activations": "constant_norm_rescale"}, r"'constant_norm_rescale'.*allowed.*layer_norm"),
        ({"activation": "gated"}, r"'gated'.*allowed.*topk"),
        ({"d_sae": 0}, r"d_sae must be a positive int; got 0"),
        ({"d_sae": -3}, r"d_sae must be a positive int; got -3"),
        ({"activation": "topk"}, r"topk.*needs k.*d_sae=16.*k=None"),
        ({"activation": "topk", "k": 17}, r"k must be an int in \[1, d_sae=16\]; got k=17"),
        ({"activation": "topk", "k": 0}, r"got k=0"),
        ({"k": 4}, r"k=4 is not used with activation='relu'.*leave k unset"),
        ({"l1_coeff": -1.0}, r"l1_coeff must be a finite number >= 0; got -1.0"),
        ({"aux_k_coeff": float("nan")}, r"aux_k_coeff must be a finite number >= 0; got nan"),
        ({"l0_coeff": float("inf")}, r"l0_coeff must be a finite number >= 0; got inf"),
        ({"jumprelu_bandwidth": 0.0}, r"jumprelu_bandwidth must be a finite number > 0; got 0.0"),
        ({"dead_window": 0}, r"dead_window must be an int >= 1; got 0"),
        ({"jumprelu_start_batches": 0}, r"jumprelu_start_batches must be an int >= 1; got 0"),
        ({"activation": "batchtopk"}, r"'batchtopk' needs k.*on average over a batch.*k=None"),
        ({"activation": "jumprelu"}, r"'jumprelu' needs k.*the L0 at which its thresholds start.*k=None"),
        ({"activation": "jumprelu", "k": 17}, r"k must be an int in \[1, d_sae=16\]; got k=17"),
    ],
)
def test_bad_config_names_value_and_allowed(kwargs, pattern):
    args = {"d_in": 8, "d_sae": 16, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        SAEConfig(**args)
    with pytest.raises(ValueError, match=pattern):
        SparseAutoencoder(**args)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match=r"'cuda'.*allowed.*reference"):
        SparseAutoencoder(8, 16, backend="cuda")
