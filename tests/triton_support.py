"""Shared set-up of the Triton kernel tests: the device, the interpreter guard, the kernel tolerances.

On a machine without CUDA the kernels run under the Triton interpreter: tests/conftest.py sets
TRITON_INTERPRET=1 before triton's first import (triton builds its language interpreted or compiled
then); a CUDA machine runs the compiled kernels.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from saetron.kernels.triton_common import interpreting  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():
    raise RuntimeError(
        "triton was imported before TRITON_INTERPRET=1 was set, so these CPU tests cannot interpret the "
        "kernels: tests/conftest.py sets it; run the tests through pytest from the repository root"
    )

# fp32: summation order only (n * eps = 576 * 6e-8 = 3.4e-5 of the terms' magnitude): 1e-4.
# bf16: fp32 accumulation rounded once to bf16 (2^-8 relative): two ulps, 2^-7.
RTOL = {torch.float32: 1e-4, torch.bfloat16: 2.0**-7}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """rtol = RTOL[dtype]; atol = rtol x the largest |expected| (cancellation scales with the largest)."""
    rtol = RTOL[dtype]
    scale = float(expected.detach().abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=rtol * max(scale, 1e-6))
