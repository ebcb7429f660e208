"""The trainer's SAE initialization: encoder = s * W_dec^T with s fitted by least squares, b_dec = the mean.

`SparseAutoencoder`'s constructor keeps Kaiming-uniform (gain sqrt(2)): encoder columns of norm ~1.41
against unit decoder rows, so the first reconstructions overshoot and a short run spends its steps
shrinking the encoder. The trainer's default (`--encoder_init transpose`) instead sets, on the first
global batch x [N, d_in] (rows every rank reads, so every rank computes the same s):

    b_dec  = mean_n x_n                          (x_n: the SAE's normalized input, see model.py)
    W_enc  = s * W_dec^T
    b_enc  = -b_dec @ W_enc                      (0 with apply_b_dec_to_input, which subtracts b_dec itself)
    s      = <g, x_n - b_dec> / ||g||^2          (sums over n and d)
    where  g = f(1) @ W_dec,  f(1) = the activations at s = 1

so that the pre-activations are those of the centered input: pre(s) = s * ((x_n - b_dec) @ W_dec^T),
with either setting of apply_b_dec_to_input (sparsify's "centered pre-activations"; Anthropic's
subtraction of b_dec).

Why the closed form is exact (not a linearization). pre(s) = s * pre(1), and pre(1) does not depend
on s. For s > 0, scaling by s keeps the order of the pre-activations and their signs, so TopK selects
the same latents and ReLU zeroes the same ones: f(s) = s * f(1), exactly. The reconstruction
recon_n(s) = s * g + b_dec is then linear in s and the training loss at init,
mean (recon_n(s) - x_n)^2, is a parabola in s with its minimum at the s above. This holds because b_enc
scales with s; a fixed non-zero b_enc would break it (s * v + c is not s times anything). The fit is
in the SAE's normalized space because the loss is measured there: with `expected_average_only_in`
(centering) that is the error in input units; with `layer_norm` each token's error is measured after
dividing by its own std, as the training loss does.

The sign: row by row <g, x_n - b_dec> = sum_i f_i <W_dec[i], x_n - b_dec> = sum_i f_i pre_i(1) =
sum_i f_i^2 >= 0 (TopK and ReLU keep only positive pre-activations), so s > 0 as soon as one latent
fires on one row.

Why b_dec = the mean and centered pre-activations. Under the default centering x_n is already
(nearly) centered, b_dec ~ 0 and b_enc ~ 0: the seed's values. Under `layer_norm` or `none` the
tokens share a large offset; without centering the pre-activations the same few latents aligned with
it win TopK on every token and most latents never fire. Measured with bench/quality.py's set-up at
layer 15 with layer_norm (d_sae 4608, k 32, 200 steps, warm-up 16, linear decay; figures on the
held-out store): at lr 3e-3, b_dec = mean with b_enc = 0 left 56.7% of the latents dead (EV over
normal rows 0.750), centered pre-activations 14.4% (0.758), the seed's Kaiming init 21.8% (0.701); at
the default lr, 53.6% -> 0.4%. With the default centering (layer 12, k 64, 132 steps) b_dec = 0 and
b_dec = mean (both with b_enc = 0) gave the same held-out EV, 0.7296 and 0.7294.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows per chunk of the fit: bounds the dense [rows, d_sae] activations (4096 x 57344 fp32 = 0.9 GiB).
FIT_CHUNK_ROWS = 4096


@torch.no_grad()
def fit_encoder_scale(model, x: Tensor, chunk_rows: int = FIT_CHUNK_ROWS) -> float:
    """The s minimizing the training loss at W_enc = s * W_dec^T, b_enc = -b_dec @ W_enc (0 with
    apply_b_dec_to_input) on x [N, d_in], at the model's current b_dec (module docstring). Leaves the
    model unchanged; computes on the model's device, sums in float64 over chunks of `chunk_rows` rows.
    Raises ValueError when no latent fires on x (then there is nothing to scale).
    """
    device = model.W_dec.device
    W_dec = model.W_dec.detach().float()  # [d_sae, d_in]
    b_dec = model.b_dec.detach().float()  # [d_in]
    saved = model.W_enc.detach().clone(), model.b_enc.detach().clone()
    set_encoder(model, 1.0)
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
    assert scale > 0, scale  # sum_i f_i^2 > 0 row by row (module docstring)
    return scale


@torch.no_grad()
def set_encoder(model, scale: float) -> None:
    """W_enc = scale * W_dec^T and b_enc = -b_dec @ W_enc (0 when the model subtracts b_dec itself)."""
    model.W_enc.copy_(scale * model.W_dec.detach().t())
    if model.cfg.apply_b_dec_to_input:
        model.b_enc.zero_()
    else:
        model.b_enc.copy_(-(model.b_dec.detach() @ model.W_enc.detach()))


@torch.no_grad()
def init_transpose(model, x: Tensor) -> float:
    """Set b_dec = mean of normalize(x), then W_enc = s * W_dec^T and b_enc = -b_dec @ W_enc with s
    fitted on x [N, d_in] (module docstring); returns s. `model`: the unsharded SparseAutoencoder."""
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"the encoder init needs rows [N, d_in] with N >= 1; got shape {tuple(x.shape)}")
    device = model.W_dec.device
    total = torch.zeros(model.d_in, dtype=torch.float64, device=device)
    for chunk in x.split(FIT_CHUNK_ROWS):
        total += model.normalize(chunk.to(device, torch.float32))[0].double().sum(0)
    model.b_dec.copy_(total / x.shape[0])
    scale = fit_encoder_scale(model, x)
    set_encoder(model, scale)
    return scale
