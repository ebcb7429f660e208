"""The feature report: report/index.html, one self-contained page (inline CSS, images as data URIs).

For the `report_top` most frequent latents and a seeded sample of `report_rare` of the rarest tenth of
the live ones: density, max activation, the top-activating contexts from the store and, with a model,
the logit effect of the decoder row.

Contexts. The store keeps a window's rows consecutively with increasing positions (`ActivationStore.window_of`
finds a row's window), so a row's context is its neighbouring rows of the same window; positions the
store left out (BOS, other special tokens) show as a gap mark. Tokens are decoded one by one with the
store's tokenizer; each is shaded by the latent's activation on it (the SAE run on those rows), the
example's own token is framed.

Logit effect of latent j: (W_dec[j] * g) @ W_U^T over the vocabulary, W_U [V, d_in] the unembedding
and g the final norm's weight (1 where the model has none): the direct effect of the decoder row on
the logits, ignoring the norm's per-token scale. The top and bottom tokens are listed.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from saetron.collect.store import ActivationStore
from saetron.kernels.sparse_code import SparseCode

from .features import FeatureStats

GAP_MARK = "\u2502"  # a left-out (special) token between two shown ones
LOGIT_TOKENS = 10


@dataclass
class Example:
    row: int
    activation: float
    tokens: list[str]
    activations: list[float]  # the latent on each shown token
    center: int  # index of the example's row in `tokens`
    gaps_before: list[bool]  # a left-out token precedes this one


@dataclass
class FeatureCard:
    latent: int
    group: str  # "frequent" or "rare"
    count: int
    density: float
    max_activation: float
    examples: list[Example] = field(default_factory=list)
    logit_top: list[tuple[str, float]] = field(default_factory=list)
    logit_bottom: list[tuple[str, float]] = field(default_factory=list)


def select_latents(stats: FeatureStats, n_top: int, n_rare: int, seed: int) -> tuple[list[int], list[int]]:
    """(the n_top most frequent latents, n_rare sampled from the rarest tenth of the other live ones,
    rarest first)."""
    counts = stats.counts
    live = torch.nonzero(counts > 0).squeeze(1)
    by_count = live[torch.argsort(counts[live], descending=True, stable=True)]
    top = by_count[:n_top].tolist()
    chosen = set(top)
    rest = [j for j in reversed(by_count.tolist()) if j not in chosen]  # rarest first
    pool = rest[: max(n_rare, len(rest) // 10)]
    rng = np.random.default_rng(seed)
    rare = sorted(rng.choice(pool, size=min(n_rare, len(pool)), replace=False).tolist(),
                  key=lambda j: (int(counts[j]), j)) if pool else []
    return top, rare


def _latent_column(features: Tensor | SparseCode, latent: int) -> Tensor:
    """[n] the activation of one latent per row."""
    if isinstance(features, SparseCode):
        return (features.values * (features.indices == latent)).sum(-1)
    return features[:, latent]


def _token_text(tokenizer, token_id: int) -> str:
    text = tokenizer.decode([token_id])
    return text.replace("\n", "\u21b5").replace("\t", "\u2192")


@torch.no_grad()
def build_examples(store: ActivationStore, sae, latent: int, top: list[tuple[int, float]], tokenizer,
                   context: int) -> list[Example]:
    """The contexts of `top` [(row, activation)], with the latent's activation on every shown token."""
    spans = []
    for row, _ in top:
        lo, hi = store.window_of(row)
        spans.append((max(lo, row - context), min(hi, row + context + 1)))
    chunks = [store.read(lo, hi) for lo, hi in spans]
    x = torch.cat([c.activations for c in chunks]).to(sae.W_enc.device)  # [rows, d_in]
    values = _latent_column(sae(x)[1], latent).float().cpu().tolist()
    out, at = [], 0
    for (row, activation), (lo, _), chunk in zip(top, spans, chunks):
        n = len(chunk.token_ids)
        positions = chunk.positions.tolist()
        out.append(Example(
            row=row, activation=activation,
            tokens=[_token_text(tokenizer, int(t)) for t in chunk.token_ids],
            activations=values[at:at + n], center=row - lo,
            gaps_before=[i > 0 and positions[i] - positions[i - 1] > 1 for i in range(n)],
        ))
        at += n
    return out


def logit_effects(W_dec: Tensor, unembed: Tensor, norm_weight: Tensor | None, tokenizer,
                  latents: list[int], n: int = LOGIT_TOKENS) -> dict[int, tuple[list, list]]:
    """latent -> ([(token, logit)] top n, [(token, logit)] bottom n), module docstring's formula."""
    rows = W_dec[latents].float()  # [m, d_in]
    if norm_weight is not None:
        rows = rows * norm_weight.float().to(rows.device)
    logits = rows @ unembed.float().to(rows.device).T  # [m, V]
    out = {}
    for i, latent in enumerate(latents):
        top, bottom = torch.topk(logits[i], n), torch.topk(logits[i], n, largest=False)
        out[latent] = ([(_token_text(tokenizer, int(t)), float(v)) for v, t in zip(*top)],
                       [(_token_text(tokenizer, int(t)), float(v)) for v, t in zip(*bottom)])
    return out


# -- HTML ----------------------------------------------------------------------------------------

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.6em; }
h2 { font-size: 1.25em; margin-top: 2em; border-top: 1px solid #ddd; padding-top: .8em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { padding: 2px 10px; text-align: left; }
th { background: #f3f3f3; } tr:nth-child(even) td { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.plots img { max-width: 49%; border: 1px solid #eee; }
.example { font-family: ui-monospace, monospace; white-space: pre-wrap; margin: 3px 0; padding: 3px 6px;
           border-left: 3px solid #f0a040; background: #fcfcfc; }
.example .act { color: #888; display: inline-block; min-width: 5.5em; }
.tok { border-radius: 2px; } .tok.center { outline: 2px solid #c0392b; font-weight: bold; }
td.snip { font-family: ui-monospace, monospace; white-space: pre; font-size: 12px; max-width: 480px;
          overflow: hidden; text-overflow: ellipsis; }
.gap { color: #bbb; } .logits span { font-family: ui-monospace, monospace; background: #eef; margin: 0 2px;
        padding: 0 3px; } .logits .neg { background: #fee; } .muted { color: #777; } a { color: #1a5fb4; }
"""


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _example_html(ex: Example, max_activation: float) -> str:
    parts = []
    for i, (tok, act) in enumerate(zip(ex.tokens, ex.activations)):
        if ex.gaps_before[i]:
            parts.append(f'<span class="gap" title="special token left out of the store">{GAP_MARK}</span>')
        alpha = min(1.0, max(0.0, act / max_activation)) if max_activation > 0 else 0.0
        cls = "tok center" if i == ex.center else "tok"
        parts.append(f'<span class="{cls}" style="background: rgba(255,140,0,{alpha:.2f})" '
                     f'title="{act:.3g}">{_esc(tok)}</span>')
    return (f'<div class="example" data-row="{ex.row}" data-activation="{ex.activation:.6g}">'
            f'<span class="act">{ex.activation:.3g}</span>{"".join(parts)}</div>')


def _logits_html(card: FeatureCard) -> str:
    if not card.logit_top:
        return ""
    top = "".join(f'<span title="{v:+.3f}">{_esc(t)}</span>' for t, v in card.logit_top)
    bottom = "".join(f'<span class="neg" title="{v:+.3f}">{_esc(t)}</span>' for t, v in card.logit_bottom)
    return f'<p class="logits">promotes {top}<br>suppresses {bottom}</p>'


def _card_html(card: FeatureCard) -> str:
    examples = "".join(_example_html(ex, card.max_activation) for ex in card.examples)
    return (f'<section class="feature" id="latent-{card.latent}" data-latent="{card.latent}" '
            f'data-group="{card.group}">'
            f'<h2>Latent {card.latent} <span class="muted">({card.group})</span></h2>'
            f'<p>density {card.density:.3e} ({card.count} tokens) &middot; max activation '
            f'{card.max_activation:.4g} &middot; <a href="#top">index</a></p>'
            f'{_logits_html(card)}<h3>Top activations</h3>{examples or "<p>none</p>"}</section>')


def _snippet(card: FeatureCard, side: int = 5) -> str:
    """The top example's active token with `side` tokens each side, the token in bold."""
    if not card.examples:
        return ""
    ex = card.examples[0]
    lo, hi = max(0, ex.center - side), min(len(ex.tokens), ex.center + side + 1)
    return (_esc("".join(ex.tokens[lo:ex.center])) + f"<b>{_esc(ex.tokens[ex.center])}</b>"
            + _esc("".join(ex.tokens[ex.center + 1:hi])))


def _index_rows(cards: list[FeatureCard]) -> str:
    rows = []
    for c in cards:
        logits = "".join(f"<span>{_esc(t)}</span>" for t, _ in c.logit_top[:5])
        rows.append(f'<tr><td><a href="#latent-{c.latent}">{c.latent}</a></td>'
                    f'<td class="num">{c.density:.3e}</td><td class="num">{c.count}</td>'
                    f'<td class="num">{c.max_activation:.4g}</td><td class="snip">{_snippet(c)}</td>'
                    f'<td class="logits">{logits}</td></tr>')
    head = ("<tr><th>latent</th><th>density</th><th>tokens</th><th>max act.</th><th>top example</th>"
            "<th>top logits</th></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_report(title: str, summary: list[tuple[str, str]], cards: list[FeatureCard],
                  plots: dict[str, bytes], notes: list[str]) -> str:
    """The whole page; `summary` [(label, value)] heads it, `plots` {alt: PNG bytes} are inlined."""
    frequent = [c for c in cards if c.group == "frequent"]
    rare = [c for c in cards if c.group == "rare"]
    table = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in summary)
    images = "".join(f'<img alt="{_esc(alt)}" src="{_png_data_uri(png)}">' for alt, png in plots.items())
    note_html = "".join(f"<p class=\"muted\">{_esc(n)}</p>" for n in notes)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f'<style>{CSS}</style></head><body><h1 id="top">{_esc(title)}</h1><table>{table}</table>'
            f'<div class="plots">{images}</div>{note_html}'
            f'<h2>Most frequent latents ({len(frequent)})</h2>{_index_rows(frequent)}'
            f'<h2>Rare latents ({len(rare)}, sampled from the rarest tenth of the live ones)</h2>'
            f'{_index_rows(rare)}{"".join(_card_html(c) for c in cards)}</body></html>')


GAP_NOTE = f"{GAP_MARK} marks a special token (BOS, EOS) the store left out."


class IdTokenizer:
    """Stands in for a tokenizer that cannot be loaded: tokens show as #id."""

    def decode(self, ids: list[int]) -> str:
        return "".join(f"#{i} " for i in ids)


def write_report(path, sae, store: ActivationStore, stats: FeatureStats, tokenizer, *, top: int, rare: int,
                 examples_context: int, seed: int, summary: list[tuple[str, str]], plots: dict[str, bytes],
                 unembed: Tensor | None = None, norm_weight: Tensor | None = None) -> None:
    """Select the latents, build their cards and write the page to `path` (its folder is created).
    `unembed` [V, d_in] (and the final norm's weight [d_in]) give the logit effects; None: omitted."""
    tokenizer = tokenizer or IdTokenizer()
    frequent, rarest = select_latents(stats, top, rare, seed)
    effects = {}
    if unembed is not None:
        effects = logit_effects(sae.W_dec.detach(), unembed, norm_weight, tokenizer, frequent + rarest)
    density, cards = stats.density(), []
    for group, latents in (("frequent", frequent), ("rare", rarest)):
        for j in latents:
            card = FeatureCard(j, group, int(stats.counts[j]), float(density[j]),
                               float(stats.max_activation[j]))
            card.examples = build_examples(store, sae, j, stats.top_examples(j), tokenizer, examples_context)
            card.logit_top, card.logit_bottom = effects.get(j, ([], []))
            cards.append(card)
    notes = [f"{GAP_NOTE} Shading: the latent's activation on each token relative to its max activation in "
             "the evaluated rows; the framed token is the example's own row."]
    if unembed is None:
        notes.append("Logit effects need --model.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report("SAE feature report", summary, cards, plots, notes), encoding="utf-8")
