"""Backend choice for the SAE's ops: which implementation runs, and when the dense path is faster.

Backends (`SparseAutoencoder(backend=...)`, overridden by the environment variable SAETRON_BACKEND),
each a module with the interface of kernels/backend.py (`backend_ops(name)`):
    triton     `saetron.kernels.triton_ops`: cuBLAS GEMM + Triton selects, decode and backward; CUDA
               tensors, or CPU tensors under TRITON_INTERPRET=1 (tests only: the interpreter is slow).
    torch      `saetron.kernels.torch_sparse`: the sparse path in plain torch ops, any device.
    reference  `saetron.kernels.reference`: everything dense, the oracle.
    auto       triton on CUDA when `saetron.kernels.triton_ops` imports (else torch, logged once),
               torch elsewhere; and per batch the reference backend when the code is too wide for the
               sparse ops to pay off (`DensityGate`).

The density threshold is the padded width K of a code (its widest token's active latents) above which
a sparse training step is slower than the dense one, as a fraction of d_sae per device type
(DENSE_WIDTH_FRACTION, the one place these thresholds live).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from types import ModuleType

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch", "reference")
ENV_VAR = "SAETRON_BACKEND"
# Measured with `pytest bench/bench_step.py --density-sweep` on the project's 2-core CPU (torch 2.13,
# MKL), d=576, m=4608, B=4096, ReLU, fp32: the full training step (forward, backward, fused Adam,
# decoder-norm) on the torch backend vs the dense reference, steps alternated so that both see the
# same background load, best of 4 (load average ~1.2):
#     width K      131    405    503    627    832   1086
#     sparse ms    288    655    755    871   1143   1638
#     dense ms     676    852    781    718    635    777      (dense does not depend on K: noise)
#     ratio       0.43   0.77   0.97   1.21   1.80   2.11
# They cross at K ~ 510 (an earlier run under heavier load: ~550); 512 it is. The dense step's cost
# grows with d_sae and the sparse step's with K, so other widths use the same fraction of d_sae
# (512 / 4608 = 1/9), an assumption measured at this one shape only.
DENSE_WIDTH_THRESHOLD = 512
DENSE_WIDTH_MEASURED_AT = 4608  # the d_sae of the sweep above
DENSE_WIDTH_FRACTION = {  # device type -> (K, d_sae): the threshold is K / d_sae of the latents
    "cpu": (DENSE_WIDTH_THRESHOLD, DENSE_WIDTH_MEASURED_AT),
    # UNMEASURED: the Triton path's crossover on a GPU has not been measured; the CPU value stands in.
    "cuda": (DENSE_WIDTH_THRESHOLD, DENSE_WIDTH_MEASURED_AT),
}


def dense_width_threshold(d_sae: int, device_type: str = "cpu") -> int:
    """The width K above which backend auto runs a batch on the reference backend."""
    width, measured_at = DENSE_WIDTH_FRACTION.get(device_type, DENSE_WIDTH_FRACTION["cpu"])
    return max(1, width * d_sae // measured_at)


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this device or in this environment."""


_logged: set[str] = set()


def log_once(key: str, message: str, *args: object, level: int = logging.WARNING) -> None:
    """Log `message` the first time `key` is seen in this process (fallbacks to slower paths)."""
    if key not in _logged:
        _logged.add(key)
        logger.log(level, message, *args)


def requested_backend(requested: str) -> str:
    """The backend asked for: SAETRON_BACKEND when set (non-empty), else `requested`; validated."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        if env not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={env!r} is not a backend; allowed: {BACKENDS} (or unset it)")
        return env
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; allowed: {BACKENDS}")
    return requested


@functools.cache
def triton_ops() -> ModuleType | None:
    """`saetron.kernels.triton_ops` if it imports, else None (the reason is logged once)."""
    try:
        return importlib.import_module("saetron.kernels.triton_ops")
    except Exception as err:  # ImportError, or triton failing to initialize on this machine
        log_once("triton-import", "saetron.kernels.triton_ops does not import (%s: %s)",
                 type(err).__name__, err, level=logging.INFO)
        return None


def _interpreting() -> bool:
    """Whether triton was imported interpreted: TRITON_INTERPRET counts only before triton's first
    import (it fixes the kind of every @triton.jit function then), so ask triton, not the environment.
    Called only once triton_ops() has imported."""
    from .triton_common import interpreting

    return interpreting()


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """The concrete backend ("triton", "torch" or "reference") for tensors on `device`.

    SAETRON_BACKEND overrides `requested`. Raises ValueError for an unknown name and
    BackendUnavailable for triton where it cannot run.
    """
    name = requested_backend(requested)
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            if triton_ops() is not None:
                return "triton"
            log_once("auto-cuda-torch", "backend auto on CUDA: Triton kernels unavailable, using the "
                     "slower torch sparse path (see the log above for the import error)")
        return "torch"
    if name == "triton":
        if triton_ops() is None:
            raise BackendUnavailable(
                "backend 'triton' requested but saetron.kernels.triton_ops does not import "
                "(is triton installed?); use backend 'torch' or 'auto'"
            )
        if device.type == "cpu" and not _interpreting():
            raise BackendUnavailable(
                "backend 'triton' got CPU tensors: the kernels run on CUDA, or on CPU only under "
                "TRITON_INTERPRET=1 (slow, for tests); use backend 'torch' or 'auto' on CPU"
            )
        if device.type not in ("cpu", "cuda"):
            raise BackendUnavailable(
                f"backend 'triton' runs on CUDA (or on CPU when interpreting); got {device}"
            )
    return name


def backend_ops(name: str) -> ModuleType:
    """The module of a concrete backend ("reference", "torch", "triton"): kernels/backend.py's interface."""
    if name == "reference":
        from . import reference

        return reference
    if name == "torch":
        from . import torch_sparse

        return torch_sparse
    if name == "triton":
        ops = triton_ops()
        if ops is None:
            raise BackendUnavailable("saetron.kernels.triton_ops does not import")
        return ops
    raise ValueError(f"backend_ops takes 'reference', 'torch' or 'triton'; got {name!r}")


class DensityGate:
    """Per-batch choice between a sparse backend and the reference backend, for backend auto.

    The sparse step's cost grows with the padded width K of the code (its widest token's active
    latents) and passes the dense step's above `dense_width_threshold` (early ReLU training: about half
    the latents fire). A batch whose sparse code comes out wider than the threshold is redone on the
    reference backend, and the next batches stay there while their width stays above it; training
    density changes slowly, so the previous batch predicts the next one.
    """

    def __init__(self, d_sae: int, threshold: int | None = None) -> None:
        self.d_sae = d_sae
        self.threshold = threshold  # None: dense_width_threshold(d_sae, device type) at each use
        self.dense = False

    def _threshold(self, device: torch.device) -> int:
        if self.threshold is not None:
            return self.threshold
        return dense_width_threshold(self.d_sae, device.type)

    def too_wide(self, width: int, device: torch.device) -> bool:
        """Record a sparse code's width K; True if this batch should run on the reference backend."""
        threshold = self._threshold(device)
        if width > threshold:
            self.dense = True
            log_once("density-dense", "backend auto: %d active latents in a token exceed the sparse "
                     "threshold %d; using the dense path until the codes get sparser", width, threshold)
        return self.dense

    @torch.no_grad()
    def observe_dense(self, values: Tensor) -> None:
        """After a reference batch with code values [B, K]: back to sparse once the widest token has
        <= threshold active latents."""
        width = int((values > 0).sum(-1).max()) if values.numel() else 0
        self.dense = width > self._threshold(values.device)
