"""SAEAdam: Adam for a SparseAutoencoder with the decoder's unit-norm constraint and gradient clipping inside.

What a training step did around torch.optim.Adam, done by the optimizer in fewer passes:

    clip_grad_norm_(max_norm)   the global L2 norm of the gradients as Adam will use them (W_dec's
                                with each row's component along that row removed, the decoder-parallel
                                projection); returns it and keeps c = min(1, max_norm / (norm + 1e-6))
                                (torch.nn.utils.clip_grad_norm_'s factor) for the next step(), without
                                rescaling any gradient in memory
    step()                      W_dec: projection, Adam on c * projected gradient, row renormalization,
                                in one pass on CUDA (kernels/triton_adam.py); the other parameters:
                                Adam on c * gradient

Together equal to: reference.remove_parallel_grad_ref on W_dec.grad, torch.nn.utils.clip_grad_norm_,
torch.optim.Adam.step, reference.normalize_rows_ref on W_dec (tests/test_optim.py, step by step).
W_dec.grad itself is left as the backward wrote it. The state per parameter is torch.optim.Adam's
(`step`, `exp_avg`, `exp_avg_sq`), so checkpoints hold the same keys; W_dec is the param group
marked `decoder`.

Backends: `triton` (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 for tests), `torch` (the
same math in torch ops, any device), `auto` (triton on CUDA when it imports, else torch).
FSDP2: parameters, gradients and states are DTensors sharded on dim 0; the updates work on the local
shards (W_dec's rows are latents, so the row-wise projection and renormalization stay on the rank)
and the squared gradient norm is summed over the ranks with one all-reduce.
"""

from __future__ import annotations

import importlib
import logging
import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from saetron.kernels.reference import normalize_rows_ref, remove_parallel_grad_ref

if TYPE_CHECKING:
    from .model import SparseAutoencoder

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s: c = max_norm / (norm + 1e-6)


class SAEAdam(torch.optim.Optimizer):
    """Adam over a SparseAutoencoder's parameters; W_dec's step keeps its rows at unit norm."""

    def __init__(self, model: SparseAutoencoder, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, backend: str = "auto") -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0; got {lr!r}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must lie in [0, 1); got {betas!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0; got {eps!r}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown optimizer backend {backend!r}; allowed: {BACKENDS}")
        decoder = model.W_dec
        others = [p for p in model.parameters() if p is not decoder]
        groups = [{"params": others, "decoder": False}, {"params": [decoder], "decoder": True}]
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps})
        self.backend = backend
        self._clip: Tensor | None = None  # c of the last clip_grad_norm_, for the next step only

    # -- gradient norm and clipping -------------------------------------------------------------

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Global L2 norm (a 0-d fp32 tensor, all ranks) of the gradients the next step() uses.

        The next step() multiplies them by min(1, max_norm / (norm + 1e-6)); max_norm = inf only
        measures. A non-finite norm is returned as it is (the caller decides to stop).
        """
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0 (math.inf to only measure); got {max_norm!r}")
        squares, group = [], None
        for p, decoder in self._with_grads():
            W, G = _local(p), _local(p.grad)
            group = group or _process_group(p)
            if decoder:
                squares.append(self._decoder_grad_sq(W, G))
            else:
                squares.append(torch.linalg.vector_norm(G, dtype=torch.float32).square())
        if not squares:
            raise ValueError("clip_grad_norm_: no parameter has a gradient; call backward() first")
        total_sq = torch.stack(squares).sum()
        if group is not None:
            dist.all_reduce(total_sq, group=group)
        total = total_sq.sqrt()
        self._clip = None if math.isinf(max_norm) else (max_norm / (total + CLIP_EPS)).clamp(max=1.0)
        return total

    def _decoder_grad_sq(self, W: Tensor, G: Tensor) -> Tensor:
        if self._triton(W) and W.shape[1] <= _triton_adam().MAX_FUSED_D:
            return _triton_adam().decoder_grad_sq(W, G).sum()
        return torch.linalg.vector_norm(remove_parallel_grad_ref(W, G), dtype=torch.float32).square()

    # -- the step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One Adam step of every parameter with a gradient (W_dec: projected, then renormalized)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scale, self._clip = self._clip, None
        for group in self.param_groups:
            lr, (beta1, beta2), eps = float(group["lr"]), group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # torch.optim.Adam's lazy state: a CPU step count, states like p
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                hyper = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "step": int(state["step"])}
                tensors = [_local(t) for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                if group["decoder"]:
                    self._decoder_step(*tensors, scale, hyper)
                else:
                    self._adam_step(*tensors, scale, hyper)
        return loss

    def _decoder_step(self, W: Tensor, G: Tensor, m: Tensor, v: Tensor, scale: Tensor | None,
                      hyper: dict) -> None:
        if self._triton(W) and W.shape[1] <= _triton_adam().MAX_FUSED_D:
            _triton_adam().decoder_adam_(W, G, m, v, scale=scale, **hyper)
            return
        g = remove_parallel_grad_ref(W, G)
        _torch_adam(W, g if scale is None else g * scale, m, v, **hyper)
        W.copy_(normalize_rows_ref(W))

    def _adam_step(self, p: Tensor, g: Tensor, m: Tensor, v: Tensor, scale: Tensor | None,
                   hyper: dict) -> None:
        if self._triton(p) and all(t.is_contiguous() for t in (p, g, m, v)):
            _triton_adam().adam_(p, g, m, v, scale=scale, **hyper)
            return
        _torch_adam(p, g if scale is None else g * scale, m, v, **hyper)

    # -- helpers ----------------------------------------------------------------------------------

    def _with_grads(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield p, group["decoder"]

    def _triton(self, t: Tensor) -> bool:
        """Whether tensors like t take the Triton kernels (see the module docstring's backends)."""
        if self.backend == "torch":
            return False
        if self.backend == "auto":
            return t.device.type == "cuda" and _triton_adam() is not None
        if _triton_adam() is None:
            raise RuntimeError("SAEAdam(backend='triton'): saetron.kernels.triton_adam does not import "
                               "(is triton installed?); use backend 'auto' or 'torch'")
        return True


def _torch_adam(p: Tensor, g: Tensor, m: Tensor, v: Tensor, *, lr: float, beta1: float, beta2: float,
                eps: float, step: int) -> None:
    """torch.optim.Adam's single-tensor update (no weight decay), in place on p, m, v."""
    m.lerp_(g.to(m.dtype), 1 - beta1)
    v.mul_(beta2).addcmul_(g.to(v.dtype), g.to(v.dtype), value=1 - beta2)
    denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - beta1**step))


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2 parameter, gradient or state), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _process_group(p: Tensor):
    """The group to sum squared norms over: the DTensor's mesh group when distributed, else None."""
    mesh = getattr(p, "device_mesh", None)
    if mesh is None or not dist.is_initialized():
        return None
    return mesh.get_group()


_TRITON_ADAM: list = []


def _triton_adam():
    """saetron.kernels.triton_adam, or None when it does not import (logged once)."""
    if not _TRITON_ADAM:
        try:
            _TRITON_ADAM.append(importlib.import_module("saetron.kernels.triton_adam"))
        except Exception as err:  # ImportError, or triton failing to initialize on this machine
            logger.info("saetron.kernels.triton_adam does not import (%s: %s): SAEAdam uses torch ops",
                        type(err).__name__, err)
            _TRITON_ADAM.append(None)
    return _TRITON_ADAM[0]
