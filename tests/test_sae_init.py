"""The trainer's encoder init: the least-squares scale against a direct solve and against the model's loss."""

import pytest
import torch
from train_support import synthetic_activations

from saetron.sae import SparseAutoencoder
from saetron.sae.init import fit_encoder_scale, init_transpose, set_encoder

D_IN, D_SAE = 24, 80


def make_model(activation: str, normalize: str, apply_b_dec: bool, x: torch.Tensor) -> SparseAutoencoder:
    sae = SparseAutoencoder(D_IN, D_SAE, normalize, apply_b_dec, activation=activation,
                            k=6 if activation == "topk" else None, backend="reference")
    if normalize == "expected_average_only_in":
        sae.estimate_activation_mean([x])
    return sae


def model_mse(sae: SparseAutoencoder, scale: float) -> float:
    """The model's own training loss with the encoder set at `scale` (the selection recomputed there)."""
    set_encoder(sae, scale)
    with torch.no_grad():
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

    # b_dec is the mean normalized input, the encoder is s times the decoder's transpose, and the
    # pre-activations are those of the centered input x_n - b_dec (b_enc does it unless the model does).
    x_n = sae.normalize(x)[0]
    torch.testing.assert_close(sae.b_dec.detach(), x_n.mean(0), rtol=0, atol=1e-5)
    torch.testing.assert_close(sae.W_enc.detach(), scale * sae.W_dec.detach().t(), rtol=0, atol=0)
    with torch.no_grad():
        sae_in = x_n - sae.b_dec if apply_b_dec else x_n
        # fp32 sums of ~|x_n| x |W_enc| terms (~10 x 1 here): ~1e-5 apart
        torch.testing.assert_close(sae_in @ sae.W_enc + sae.b_enc, (x_n - sae.b_dec) @ sae.W_enc,
                                   rtol=1e-4, atol=1e-4)
    if apply_b_dec:
        assert bool((sae.b_enc == 0).all())  # the model subtracts b_dec itself

    # Direct solve: the features at scale 1 decoded, minus b_dec, regressed onto x_n - b_dec.
    set_encoder(sae, 1.0)
    with torch.no_grad():
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


def test_fit_leaves_the_model_unchanged():
    x = x_data()
    sae = make_model("topk", "none", False, x)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    fit_encoder_scale(sae, x)
    for k, v in sae.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_no_active_latent_is_an_error():
    sae = make_model("relu", "none", False, x_data())
    with pytest.raises(ValueError, match="no active latent on the 4 rows"):
        fit_encoder_scale(sae, torch.zeros(4, D_IN))
