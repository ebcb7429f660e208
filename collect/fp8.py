"""float8_e4m3fn storage of activation rows with one float32 scale per row: half the bytes of bfloat16.

Encode a row x [d] (any float dtype; the arithmetic is float32):
    s = max_i |x_i| / 448          (448 = e4m3fn's largest finite value; s = FLOAT32_TINY for a zero row)
    q = e4m3fn(clamp(x / s, -448, 448))        [d] 1 byte each, round to nearest even
Decode: x̂ = float32(q) * s, then cast to the wanted dtype.

Error bound, per element, from the format: e4m3fn has 3 explicit mantissa bits, so between 2^e and 2^(e+1)
its values are 2^(e-3) apart and rounding to the nearest is off by at most 2^(e-4) <= 2^-4 |y| for the
scaled value y = x / s; below the smallest normal 2^-6 the values are 2^-9 apart (off by at most 2^-10).
The division and the decode's product are float32 (relative error 2^-24 each). Hence

    |x̂_i - x_i| <= 2^-4 |x_i| + 2^-10 s  (+ a few 2^-24 |x_i|)

and for the row, ||x̂ - x|| <= 2^-4 ||x|| + 2^-10 s sqrt(d). The clamp only removes float32 round-off of
the largest element (x / s can come out at 448 * (1 + 2^-23)); CPU torch saturates there, CUDA may not.

The collector encodes on the device, before the device-to-host copy (so the copy and the disk move half
the bytes) and records per row ||x̂ - x||, which the manifest summarizes per shard (QUANTIZATION_STATS).
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
FLOAT32_TINY = torch.finfo(torch.float32).tiny
# Per-shard summary of the encoding error, in the manifest: relative_error = sqrt(sum_r ||x̂_r - x_r||^2 /
# sum_r ||x_r||^2) over the shard's rows; max_row_relative_error = max_r ||x̂_r - x_r|| / ||x_r||.
QUANTIZATION_STATS = ("relative_error", "max_row_relative_error")


def encode(rows: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
           errors: torch.Tensor | None = None) -> None:
    """rows [n, d] float -> codes [n, d] float8_e4m3fn and scales [n] float32, written in place (same device);
    `errors` [n] float32, when given, receives ||decode(codes, scales) - rows|| per row."""
    x = rows.float()  # [n, d]
    scale = (x.abs().amax(dim=1) / FP8_MAX).clamp_min_(FLOAT32_TINY)  # [n]
    scales.copy_(scale)
    codes.copy_((x / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX))  # the cast rounds to nearest even
    if errors is not None:
        torch.linalg.vector_norm(codes.float() * scale[:, None] - x, dim=1, out=errors)


def decode(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes [n, d] float8_e4m3fn (or its bytes as uint8) and scales [n] float32 -> rows [n, d] in `dtype`."""
    if codes.dtype == torch.uint8:
        codes = codes.view(FP8)
    return (codes.float() * scales.float()[:, None]).to(dtype)


def quantization_stats(errors_sq: float, norms_sq: float, max_row_relative_error: float) -> dict:
    """QUANTIZATION_STATS of a shard from its rows' sums of ||x̂ - x||^2 and ||x||^2 and the largest ratio."""
    return {"relative_error": (errors_sq / norms_sq) ** 0.5 if norms_sq > 0 else 0.0,
            "max_row_relative_error": max_row_relative_error}
