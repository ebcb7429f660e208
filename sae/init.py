"""The trainer's SAE initialization: encoder = s * W_dec^T with s fitted by least squares, b_dec = the mean.

`SparseAutoencoder`'s constructor keeps Kaiming-uniform (gain sqrt(2)): encoder columns of norm ~1.41
against unit decoder rows, so the first reconstructions overshoot and a short run spends its steps
shrinking the encoder. The trainer's default (`--encoder_init transpose`) instead sets, on the first
global batch x [N, d_in] (rows every rank reads, so every rank computes the same s):

    b_dec  = mean_n x_n                         (x_n: the SAE's normalized input, see model.py)
    b_enc  = 0
    W_enc  = s * W_dec^T                         s = <g, x_n - b_dec> / ||g||^2   (sums over n and d)
    where  g = f(1) @ W_dec,  f(1) = the activations with W_enc = W_dec^T

Why the closed form is exact (not a linearization). With b_enc = 0 the pre-activations are
pre(s) = s * (sae_in @ W_dec^T), sae_in = x_n - b_dec * apply_b_dec_to_input, which does not depend on
s. For s > 0, scaling by s keeps the order of the pre-activations and their signs, so TopK selects the
same latents and ReLU zeroes the same ones: f(s) = s * f(1), exactly. The reconstruction
recon_n(s) = s * g + b_dec is then linear in s and the training loss at init,
mean (recon_n(s) - x_n)^2, is a parabola in s with minimum at the s above. The fit is in the SAE's
normalized space because that is where the loss is measured: with `expected_average_only_in`
(centering) it equals the error in input units; with `layer_norm` each token's error is measured after
dividing by its own std, as the training loss does. A non-zero b_enc would break the homogeneity
(s * v + b_enc is not s times anything), hence b_enc = 0 first.

The sign. With b_dec applied to the input, sae_in = x_n - b_dec is the target, and row by row
<g, sae_in> = sum_i f_i <W_dec[i], sae_in> = sum_i f_i^2 >= 0 (f_i = the selected pre-activations
<W_dec[i], sae_in> > 0), so s >= 0. Without it, <g, x_n - b_dec> = sum_i f_i^2 - <g, b_dec> can in
principle be <= 0, where the argument fails: `fit_encoder_scale` then raises.

b_dec = the batch mean of x_n. Under the default centering x_n is already (nearly) centered and
b_dec ~ 0, the seed's value; under `layer_norm` or `none` the tokens' common offset is large and
b_dec = its mean starts the decoder where the data is (sparsify's choice). Measured with
bench/quality.py's set-up (SmolLM2-135M layer 12, d_sae 4608, k 64, 132 steps of 512, held-out EV
over normal rows): centering 0.7294 with the mean, 0.7296 with b_dec = 0 (equal); layer_norm 0.715
with the mean, 0.666 with b_dec = 0. s was 0.583 there (centering) and 0.318 (layer_norm).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows per chunk of the fit: bounds the dense [rows, d_sae] activations (4096 x 57344 fp32 = 0.9 GiB).
FIT_CHUNK_ROWS = 4096


@torch.no_grad()
def fit_encoder_scale(model, x: Tensor, chunk_rows: int = FIT_CHUNK_ROWS) -> float:
    """The s minimizing the loss of W_enc = s * W_dec^T on x [N, d_in] at the model's current b_dec
    and b_enc = 0 (module docstring). Leaves the model unchanged; computes on the model's device.

    Sums in float64 over chunks of `chunk_rows` rows. Raises ValueError when no latent fires on x or
    when s <= 0 (the homogeneity argument holds for s > 0 only).
    """
    device = model.W_dec.device
    W_dec = model.W_dec.detach().float()  # [d_sae, d_in]
    b_dec = model.b_dec.detach().float()  # [d_in]
    saved = model.W_enc.detach().clone(), model.b_enc.detach().clone()
    model.W_enc.copy_(W_dec.t())
    model.b_enc.zero_()
    numerator = torch.zeros((), dtype=torch.float64, device=device)
    denominator = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for chunk in x.split(chunk_rows):
            x_n, _ = model.normalize(chunk.to(device, torch.float32))  # [n, d_in]
            g = model.encode(x_n) @ W_dec  # [n, d_in], f(1) @ W_dec
            numerator += (g.double() * (x_n - b_dec).double()).sum()
            denominator += g.double().pow(2).sum()
    finally:
        model.W_enc.copy_(saved[0])
        model.b_enc.copy_(saved[1])
    if denominator.item() == 0.0:
        raise ValueError(f"the encoder init found no active latent on the {x.shape[0]} rows of the first "
                         "batch (all reconstructions are 0); use --encoder_init kaiming or check the data")
    scale = (numerator / denominator).item()
    if not scale > 0:
        raise ValueError(f"the least-squares encoder scale is {scale:.4g} on the first batch, expected > 0 "
                         "(the fit is exact only for s > 0); use --encoder_init kaiming or "
                         "--apply_b_dec_to_input, which makes s >= 0 by construction")
    return scale


@torch.no_grad()
def init_transpose(model, x: Tensor) -> float:
    """Set b_dec = mean of normalize(x), b_enc = 0, W_enc = s * W_dec^T with s fitted on x [N, d_in]
    (module docstring); returns s. `model` is the unsharded SparseAutoencoder, on any device."""
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"the encoder init needs rows [N, d_in] with N >= 1; got shape {tuple(x.shape)}")
    device = model.W_dec.device
    total = torch.zeros(model.d_in, dtype=torch.float64, device=device)
    for chunk in x.split(FIT_CHUNK_ROWS):
        total += model.normalize(chunk.to(device, torch.float32))[0].double().sum(0)
    model.b_dec.copy_(total / x.shape[0])
    model.b_enc.zero_()
    scale = fit_encoder_scale(model, x)
    model.W_enc.copy_(scale * model.W_dec.detach().t())
    return scale
