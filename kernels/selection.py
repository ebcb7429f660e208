"""Selection rules: which pre-activations an encode keeps, and the `Selection` it returns per rule.

An encode computes pre = (x - shift) @ W_enc + b_enc [B, d_sae] once and applies every rule it is given
to it (one GEMM, several selections: e.g. an SAE's code and an auxiliary code). Three rules cover the
architectures saetron knows how to build:

    RowTopK(k, mask)             per token, the k largest pre-activations among the latents where
                                 `mask` [d_sae] is True (all latents when None). A token with fewer
                                 than k candidate latents gets them all and invalid padding.
    Threshold(theta, margin)     every (token, latent) with pre > theta - margin; theta a float or a
                                 [d_sae] tensor (one threshold per latent), margin >= 0.
    BatchTopK(k)                 the B*k largest pre-activations of the whole batch of B tokens (a
                                 token may get anywhere from 0 to d_sae of them).

Ties are broken so that exactly the requested number is selected (which of several equal
pre-activations wins is backend-defined). Threshold and BatchTopK have data-dependent widths: with
`capacity` the result is [B, capacity] and a token that needs more raises `CapacityExceeded`; without,
K is the batch's widest token (at least 1).

The result of one rule, `Selection`:
    indices [B, K] int64   latent ids; padding slots hold a valid id (0)
    pre     [B, K]         the selected pre-activations, differentiable w.r.t. shift, W_enc, b_enc;
                           padding slots hold 0 and pass no gradient
    valid   [B, K] bool    which slots are selections (False: padding)
An architecture turns a Selection into features with a small torch function on [B, K] (see
saetron.sae.architectures); the order of the slots within a row carries no meaning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .sparse_code import CapacityExceeded


@dataclass(frozen=True, eq=False)
class RowTopK:
    """Per token the k largest pre-activations, among the latents where `mask` is True."""

    k: int
    """Selections per token, in [1, d_sae]."""
    mask: Tensor | None = None
    """[d_sae] bool: the candidate latents (e.g. the dead ones, for an auxiliary loss); None: all."""


@dataclass(frozen=True, eq=False)
class Threshold:
    """Every (token, latent) whose pre-activation exceeds theta - margin."""

    theta: float | Tensor = 0.0
    """A float, or a [d_sae] tensor of per-latent thresholds (compared in fp32; not differentiated)."""
    margin: float = 0.0
    """>= 0: also select pre-activations up to `margin` below theta (a straight-through estimator
    needs those; the architecture's activation gives them the value 0)."""
    capacity: int | None = None
    """Slots per token; None: as many as the widest token of the batch needs."""


@dataclass(frozen=True, eq=False)
class BatchTopK:
    """The B*k largest pre-activations of a batch of B tokens."""

    k: int
    """Average selections per token, in [1, d_sae]: B*k are selected over the whole batch."""
    capacity: int | None = None
    """Slots per token; None: as many as the widest token of the batch needs."""


SelectionRule = RowTopK | Threshold | BatchTopK


class Selection(NamedTuple):
    """One rule's selected pre-activations of a batch, padded to K slots per token (see the module doc)."""

    indices: Tensor
    pre: Tensor
    valid: Tensor

    def to_dense(self, d_sae: int) -> Tensor:
        """[B, d_sae]: the selected pre-activations at their latents, 0 elsewhere."""
        out = torch.zeros(self.pre.shape[0], d_sae, dtype=self.pre.dtype, device=self.pre.device)
        return out.scatter_add(-1, self.indices, torch.where(self.valid, self.pre, 0))


def check_rules(rules: Sequence[SelectionRule], d_sae: int, device: torch.device) -> None:
    """ValueError naming the rule and the bad field unless every rule is valid for d_sae latents."""
    if isinstance(rules, SelectionRule) or not len(rules):
        raise ValueError(f"encode takes a non-empty list of selection rules; got {rules!r}")
    for i, rule in enumerate(rules):
        if not isinstance(rule, SelectionRule):
            raise ValueError(f"rule {i}: expected RowTopK, Threshold or BatchTopK; got {type(rule).__name__}")
        where = f"rule {i} ({type(rule).__name__})"
        if isinstance(rule, RowTopK | BatchTopK):
            if isinstance(rule.k, bool) or not isinstance(rule.k, int) or not 1 <= rule.k <= d_sae:
                raise ValueError(f"{where}: k must be an int in [1, d_sae={d_sae}]; got {rule.k!r}")
        if isinstance(rule, RowTopK) and rule.mask is not None:
            mask = rule.mask
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (d_sae,):
                got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
                raise ValueError(f"{where}: mask must be a bool tensor [{d_sae}]; got {got}")
            if mask.device != device:
                raise ValueError(f"{where}: mask is on {mask.device}, the pre-activations on {device}")
        if isinstance(rule, Threshold):
            theta = rule.theta
            if isinstance(theta, Tensor):
                if not theta.is_floating_point() or theta.shape not in ((), (d_sae,)):
                    raise ValueError(f"{where}: theta must be a float tensor [] or [{d_sae}]; got "
                                     f"{theta.dtype} {tuple(theta.shape)}")
                if theta.device != device:
                    raise ValueError(f"{where}: theta is on {theta.device}, the pre-activations on {device}")
            elif isinstance(theta, bool) or not isinstance(theta, int | float) or not math.isfinite(theta):
                raise ValueError(f"{where}: theta must be a finite float or a tensor; got {theta!r}")
            if isinstance(rule.margin, bool) or not isinstance(rule.margin, int | float) or not (
                    0 <= rule.margin < math.inf):
                raise ValueError(f"{where}: margin must be a finite float >= 0; got {rule.margin!r}")
        if isinstance(rule, Threshold | BatchTopK) and rule.capacity is not None:
            cap = rule.capacity
            if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
                raise ValueError(f"{where}: capacity must be a positive int or None; got {cap!r}")


def threshold_values(rule: Threshold, d_sae: int, device: torch.device) -> Tensor:
    """theta - margin as fp32 [d_sae] (a vector theta) or [1] (a float or 0-d theta)."""
    theta = rule.theta.detach() if isinstance(rule.theta, Tensor) else torch.tensor(float(rule.theta))
    return (theta.to(device, torch.float32).reshape(-1) - float(rule.margin)).contiguous()


def pack_rows(rows: Tensor, latents: Tensor, pre: Tensor, B: int, capacity: int | None) -> Selection:
    """Entries (rows, latents, pre) [n], sorted by row, into a Selection [B, K] (differentiable in pre).

    K = capacity (CapacityExceeded when a row has more), else the widest row (at least 1).
    Reads the widest row's count from the device (one synchronization).
    """
    counts = torch.bincount(rows, minlength=B)  # [B]
    widest = int(counts.max()) if B else 0
    if capacity is not None and widest > capacity:
        raise CapacityExceeded(widest, capacity)
    K = capacity if capacity is not None else max(1, widest)
    starts = torch.cumsum(counts, 0) - counts  # [B]
    slots = rows * K + (torch.arange(rows.numel(), device=rows.device) - starts[rows])  # [n]
    indices = torch.zeros(B * K, dtype=torch.int64, device=rows.device)
    values = torch.zeros(B * K, dtype=pre.dtype, device=rows.device)
    valid = torch.zeros(B * K, dtype=torch.bool, device=rows.device)
    indices[slots] = latents
    values[slots] = pre
    valid[slots] = True
    return Selection(indices.view(B, K), values.view(B, K), valid.view(B, K))
