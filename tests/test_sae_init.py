"""The trainer's encoder init: the least-squares scale against a direct solve and against the model's loss."""

import pytest
import torch
from train_support import synthetic_activations

from saetron.sae import SparseAutoencoder
from saetron.sae.init import fit_encoder_scale, init_transpose

D_IN, D_SAE = 24, 80


def make_model(activation: str, normalize: str, apply_b_dec: bool, x: torch.Tensor) -> SparseAutoencoder:
    sae = SparseAutoencoder(D_IN, D_SAE, normalize, apply_b_dec, activation=activation,
                            k=6 if activation == "topk" else None, backend="reference")
    if normalize == "expected_average_only_in":
        sae.estimate_activation_mean([x])
    return sae


def model_mse(sae: SparseAutoencoder, scale: float) -> float:
    """The model's own training loss with W_enc = scale * W_dec^T (the selection recomputed at this scale)."""
    with torch.no_grad():
        sae.W_enc.copy_(scale * sae.W_dec.t())
        return sae(x_data())[2]["mse"].item()


def x_data() -> torch.Tensor:
    # offset (norm ~10) + sparse features: the offset makes centering, layer_norm and b_dec matter
    return synthetic_activations(256, D_IN, n_features=120, active=5.0, seed=7)


# (normalize_activations, apply_b_dec_to_input): centering, per-token layer_norm, none with b_dec applied
CASES = [("expected_average_only_in", False), ("layer_norm", False), ("none", True),
         ("expected_average_only_in", True)]


@pytest.mark.parametrize("activation", ["topk", "relu"])
@pytest.mark.parametrize("normalize, apply_b_dec", CASES)
def test_scale_is_the_least_squares_solution(activation, normalize, apply_b_dec):
    x = x_data()
    sae = make_model(activation, normalize, apply_b_dec, x)
    scale = init_transpose(sae, x)

    # b_dec is the mean normalized input, b_enc is 0, the encoder is s times the decoder's transpose.
    x_n = sae.normalize(x)[0]
    torch.testing.assert_close(sae.b_dec.detach(), x_n.mean(0), rtol=0, atol=1e-5)
    assert bool((sae.b_enc == 0).all())
    torch.testing.assert_close(sae.W_enc.detach(), scale * sae.W_dec.detach().t(), rtol=0, atol=0)

    # Direct solve: the features at scale 1 decoded, minus b_dec, regressed onto x_n - b_dec.
    with torch.no_grad():
        sae.W_enc.copy_(sae.W_dec.t())
        g = sae.decode(sae.encode(x_n)) - sae.b_dec  # [B, d_in]
    direct = torch.linalg.lstsq(g.double().reshape(-1, 1), (x_n - sae.b_dec).detach().double().reshape(-1, 1))
    # The direct side forms g as (f @ W_dec + b_dec) - b_dec in fp32, rounding each element by ~6e-8 x |b_dec|
    # (|b_dec| up to ~10x |g| here): measured 6e-9 relative on s; 1e-5 allows for that, a wrong formula is
    # off by > 1e-2.
    assert scale == pytest.approx(direct.solution.item(), rel=1e-5)

    # The homogeneity argument, checked on the model's own loss: nearby scales (whose TopK/ReLU selection
    # is recomputed) are no better. A float32 loss: equal within its rounding (~1e-6 relative).
    best = model_mse(sae, scale)
    for factor in (0.5, 0.9, 0.99, 1.01, 1.1, 2.0):
        assert best <= model_mse(sae, scale * factor) * (1 + 1e-6)
    assert scale > 0


def test_fit_leaves_the_model_unchanged_and_rejects_a_negative_scale():
    x = x_data()
    sae = make_model("topk", "none", False, x)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    fit_encoder_scale(sae, x)
    for k, v in sae.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    # Without b_dec applied to the input, a b_dec far along the data's offset makes <g, x_n - b_dec> < 0.
    with torch.no_grad():
        sae.b_dec.copy_(100 * x.mean(0))
    with pytest.raises(ValueError, match=r"least-squares encoder scale is -.*expected > 0"):
        fit_encoder_scale(sae, x)


def test_no_active_latent_is_an_error():
    sae = make_model("relu", "none", False, x_data())
    with pytest.raises(ValueError, match="no active latent on the 4 rows"):
        fit_encoder_scale(sae, torch.zeros(4, D_IN))
