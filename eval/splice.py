"""Model-level metrics: the LM's next-token loss with the SAE spliced in at its hook point.

For each batch of context windows input_ids [B, T] (the collector's packing: BOS + T - 1 tokens) three
full forwards (the collector's `LayerHook` in splice mode replaces the hooked activation h [B, T, d]):

    clean     the model as it is
    spliced   h_t -> SAE reconstruction of h_t at every position t the store keeps (`keep` [B, T]);
              positions it leaves out (position 0 / BOS and the other special tokens, unless the store
              was collected with --keep_special_tokens) keep their clean activation: the SAE never saw
              such rows (their norms are 10-100x the rest), as SAELens' evaluator keeps the activation at
              its `ignore_tokens` (BOS, EOS, pad) with exclude_special_tokens=True
    zero      h -> 0 at every position (SAELens' and dictionary_learning's zero ablation)

and per token, over the kept positions t only (SAELens masks the same way):

    CE_t  = -log p(x_{t+1} | x_<=t)              t < T - 1 (the last position has no target)
    KL_t  = KL(p_clean(. | x_<=t) || p(. | x_<=t)) every kept t, summed over the vocabulary

    ce_loss_{clean,spliced,zero} = mean CE_t;  kl_{spliced,zero} = mean KL_t
    ce_loss_recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean)
        SAELens `ce_loss_score` (evals.get_downstream_reconstruction_metrics), the same formula as
        dictionary_learning's `frac_recovered` ((CE_spliced - CE_zero) / (CE_clean - CE_zero))
    kl_recovered = (KL_zero - KL_spliced) / KL_zero        SAELens `kl_div_score`
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saetron.collect.model import LayerHook
from saetron.collect.packing import Batch

logger = logging.getLogger(__name__)

DEFINITIONS = {
    "ce_loss_recovered": "(CE_zero - CE_spliced) / (CE_zero - CE_clean): SAELens evals ce_loss_score "
                         "(= dictionary_learning frac_recovered)",
    "kl_recovered": "(KL_zero - KL_spliced) / KL_zero: SAELens evals kl_div_score",
    "kl_spliced": "mean over kept positions of KL(p_clean || p_spliced), nats (SAELens kl_div_with_sae)",
    "positions": "the SAE replaces the activation at the positions the store keeps; BOS/position 0 and "
                 "the store's other excluded special tokens keep their clean activation and are left out "
                 "of the means (SAELens exclude_special_tokens=True); zero ablation zeroes every position",
}


def keep_mask(batch: Batch) -> Tensor:
    """[B, T] bool: the positions the store keeps (the collector's `keep_idx` of this batch)."""
    keep = torch.zeros(batch.input_ids.numel(), dtype=torch.bool)
    keep[batch.keep_idx.cpu()] = True
    return keep.view(batch.input_ids.shape)


class SpliceMetrics:
    """Running sums of CE and KL per variant over kept positions (float64)."""

    VARIANTS = ("clean", "spliced", "zero")

    def __init__(self) -> None:
        self.ce = dict.fromkeys(self.VARIANTS, 0.0)
        self.kl = dict.fromkeys(("spliced", "zero"), 0.0)
        self.ce_tokens = self.kl_tokens = self.windows = 0

    def compute(self) -> dict:
        ce = {k: v / max(self.ce_tokens, 1) for k, v in self.ce.items()}
        kl = {k: v / max(self.kl_tokens, 1) for k, v in self.kl.items()}
        gap = ce["zero"] - ce["clean"]
        return {
            "ce_loss_clean": ce["clean"], "ce_loss_spliced": ce["spliced"], "ce_loss_zero": ce["zero"],
            "ce_loss_delta": ce["spliced"] - ce["clean"],
            "ce_loss_recovered": (ce["zero"] - ce["spliced"]) / gap if gap else float("nan"),
            "kl_spliced": kl["spliced"], "kl_zero": kl["zero"],
            "kl_recovered": (kl["zero"] - kl["spliced"]) / kl["zero"] if kl["zero"] else float("nan"),
            "ce_tokens": self.ce_tokens, "kl_tokens": self.kl_tokens, "windows": self.windows,
        }


def first_windows(batches: Iterable[Batch], n: int) -> Iterable[Batch]:
    """The first `n` windows of `batches`, the last batch cut to fit."""
    for batch in batches:
        if n <= 0:
            return
        if batch.input_ids.shape[0] > n:
            kept = int((batch.keep_idx < n * batch.input_ids.shape[1]).sum())  # keep_idx is ascending
            batch = Batch(batch.input_ids[:n], batch.keep_idx[:kept], batch.token_ids[:kept],
                          batch.positions[:kept], batch.stream_state)
        n -= batch.input_ids.shape[0]
        yield batch


def sae_splice(sae: nn.Module, keep: Tensor):
    """h [B, T, d] -> the SAE's reconstruction where `keep` [B, T], h elsewhere (h's dtype)."""

    def splice(h: Tensor) -> Tensor:
        reconstructed = sae(h.reshape(-1, h.shape[-1]).to(sae.W_enc.device))[0]  # [B*T, d]
        reconstructed = reconstructed.view(h.shape).to(h.device, h.dtype)
        return torch.where(keep.to(h.device).unsqueeze(-1), reconstructed, h)

    return splice


def zero_splice(h: Tensor) -> Tensor:
    return torch.zeros_like(h)


def _log_probs(model: nn.Module, input_ids: Tensor) -> Tensor:
    """[B, T, V] float32 log-probabilities of the next token."""
    logits = model(input_ids=input_ids, use_cache=False).logits
    return F.log_softmax(logits.float(), dim=-1)


def _token_ce(log_probs: Tensor, input_ids: Tensor) -> Tensor:
    """[B, T - 1] -log p(x_{t+1})."""
    return -log_probs[:, :-1].gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


@torch.inference_mode()
def splice_metrics(model: nn.Module, layers: nn.ModuleList, sae: nn.Module, target_layer: int,
                   hook_point: str, batches: Iterable[Batch], device: torch.device) -> dict:
    """CE/KL clean, spliced and zero-ablated over `batches` of windows (module docstring); a dict."""
    sums = SpliceMetrics()
    for batch in batches:
        input_ids = batch.input_ids.to(device)  # [B, T]
        keep = keep_mask(batch).to(device)  # [B, T]
        ce_keep, n_ce, n_kl = keep[:, :-1], int(keep[:, :-1].sum()), int(keep.sum())
        clean = _log_probs(model, input_ids)  # [B, T, V]
        sums.ce["clean"] += float(_token_ce(clean, input_ids)[ce_keep].double().sum())
        p_clean = clean.exp()
        for name, splice in (("spliced", sae_splice(sae, keep)), ("zero", zero_splice)):
            with LayerHook(layers, target_layer, hook_point, splice=splice):
                log_probs = _log_probs(model, input_ids)  # [B, T, V]
            sums.ce[name] += float(_token_ce(log_probs, input_ids)[ce_keep].double().sum())
            kl = F.kl_div(log_probs, p_clean, reduction="none").sum(-1)  # [B, T], KL(clean || variant)
            sums.kl[name] += float(kl[keep].double().sum())
        sums.ce_tokens += n_ce
        sums.kl_tokens += n_kl
        sums.windows += input_ids.shape[0]
    if sums.ce_tokens == 0:
        raise ValueError("the model-level evaluation saw no kept token (the text is empty, or every token is "
                         "special): give a --dataset with text, or more --ce_windows")
    return sums.compute()
