"""Evaluation entry points: `evaluate` (what a trainer calls) and `run` (the CLI's whole job).

    evaluate(sae, batches) -> dict               reconstruction metrics of metrics.py + dead fraction
    evaluate_reconstruction(sae, batches, ...)   the same and the FeatureStats (density, top rows)
    run(EvalConfig) -> dict                      store + SAE (+ model): metrics.json, plots, report

`batches` is a callable returning a fresh iterable of rows [n, d_in] (any float dtype, any device):
it is iterated twice, first for the mean and the median norm, then through the SAE.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor

from saetron.collect.store import ActivationStore

from .config import EvalConfig
from .features import FeatureStats
from .metrics import ReconstructionMetrics, RowStats
from .provenance import TrainedOn, check_store, held_out, trained_on
from .store import open_store, shard_range, store_batches

logger = logging.getLogger(__name__)

Batches = Callable[[], Iterable[Tensor]]
DEFINITIONS = {
    "explained_variance": "1 - sum||x - x_hat||^2 / (sum||x||^2 - ||sum x||^2 / N), pooled over all "
                          "rows: SAELens >= 6.45 evals.ExplainedVarianceCalculator",
    "fvu": "1 - explained_variance",
    "fvu_per_token": "||x_i - x_hat_i||^2 / ||x_i - mean(x)||^2",
    "mse": "mean over rows of ||x - x_hat||^2 summed over d_in (SAELens 6.x mse); "
           "mse_per_element = mse / d_in",
    "relative_reconstruction_bias": "sum||x_hat||^2 / sum<x, x_hat> (arXiv 2404.16014 eq. 10), pooled",
    "l0": "mean over rows of the number of non-zero latents",
    "dead_fraction": "latents that fired on none of the evaluated rows / d_sae",
    "typical": "rows with ||x|| < outlier_factor * median ||x||",
    "log10_feature_density": "log10(fraction of rows a latent fires on + 1e-10)",
}


def evaluate_reconstruction(sae, batches: Batches, *, outlier_factor: float = 10.0,
                            top_k: int = 0) -> tuple[dict, FeatureStats]:
    """Metrics over every row of `batches()` and the per-latent stats (top_k rows kept per latent)."""
    device = sae.W_enc.device
    rows = RowStats(sae.d_in)
    for x in batches():
        rows.update(x.to(device))
    if rows.rows == 0:
        raise ValueError("no rows to evaluate: the store (or the held-out slice) is empty; collect more "
                         "tokens or choose other shards")
    median = rows.median_norm()
    recon = ReconstructionMetrics(sae.d_in, sae.d_sae, rows.mean(), outlier_factor * median)
    stats = FeatureStats(sae.d_sae, top_k)
    with torch.no_grad():
        for x in batches():
            x = x.to(device)
            reconstructed, features, _ = sae(x)
            l0 = stats.update(features, stats.rows)
            recon.update(x, reconstructed, l0)
    metrics = recon.compute()
    metrics.update(dead_fraction=stats.dead_fraction(), median_norm=median, outlier_factor=outlier_factor)
    return metrics, stats


def evaluate(sae, batches: Batches, *, outlier_factor: float = 10.0) -> dict:
    """Held-out reconstruction metrics of `sae` over `batches()` (see metrics.py): explained_variance,
    fvu, l0, dead_fraction, mse, cossim, ..., and their `*_typical` forms. JSON-ready."""
    return evaluate_reconstruction(sae, batches, outlier_factor=outlier_factor)[0]


def format_summary(m: dict) -> str:
    """One line: `eval | ev 0.7120 (typical 0.8010) | fvu 0.2880 | l0 32.0 | dead 12.30% | ...`."""
    line = (f"eval | ev {m['explained_variance']:.4f} (typical {m['explained_variance_typical']:.4f}) | "
            f"fvu {m['fvu']:.4f} | l0 {m['l0']:.1f} | dead {100 * m['dead_fraction']:.2f}%")
    if "ce_loss_recovered" in m:
        line += (f" | ce recovered {m['ce_loss_recovered']:.4f} (clean {m['ce_loss_clean']:.3f}, spliced "
                 f"{m['ce_loss_spliced']:.3f}, zero {m['ce_loss_zero']:.3f}) | kl {m['kl_spliced']:.4f}")
    return line + f" | {m['tokens']:,} tokens"


# -- the CLI's job -------------------------------------------------------------------------------

HELD_OUT_TEXT = "the SAE's training dataset, right after its training text (held out)"


def _ce_text(cfg: EvalConfig, trained: TrainedOn, store: ActivationStore) -> dict:
    """The text of the model-level metrics: dataset, split, text field, context size, stream start."""
    t, m = trained.manifest, store.manifest
    if cfg.dataset is None:
        source = t or m
        return {"dataset": source["dataset"], "split": source.get("split", "train"),
                "text_field": source.get("text_field"),
                "context_size": cfg.context_size or source["context_size"],
                "start": t.get("stream_state") if t else None,
                "why": HELD_OUT_TEXT if t else "the store's dataset from its beginning (the SAE's training "
                                               "store is not readable: it may repeat training text)"}
    context = cfg.context_size or m["context_size"]
    same = t is not None and (cfg.dataset, cfg.split, context) == (t["dataset"], t.get("split"),
                                                                     t["context_size"])
    return {"dataset": cfg.dataset, "split": cfg.split, "text_field": cfg.text_field, "context_size": context,
            "start": t.get("stream_state") if same else None,
            "why": HELD_OUT_TEXT if same else "--dataset from its beginning"}


def _model_metrics(cfg: EvalConfig, sae, trained: TrainedOn, store: ActivationStore, loaded) -> dict:
    from saetron.collect.data import open_text_stream
    from saetron.collect.packing import BatchProducer

    from .splice import DEFINITIONS as SPLICE_DEFINITIONS
    from .splice import first_windows, splice_metrics

    m = store.manifest
    text = _ce_text(cfg, trained, store)
    policy = m.get("special_token_policy")
    keep_special = bool(policy.get("keep_special_tokens")) if isinstance(policy, dict) else False
    producer = BatchProducer(open_text_stream(text["dataset"], text["split"]), loaded.tokenizer,
                             text["context_size"], cfg.model_batch_size, text["text_field"], keep_special,
                             text.pop("start"))
    try:
        batches = first_windows(producer, cfg.ce_windows)
        out = splice_metrics(loaded.model, loaded.layers, sae, int(m["target_layer"]), m["hook_point"],
                             batches, loaded.device)
    finally:
        producer.close()
    return {**out, "ce_text": text, "ce_definitions": SPLICE_DEFINITIONS}


def _load_model(cfg: EvalConfig, sae, store: ActivationStore, warnings: list[str]):
    from saetron.collect.model import load_model

    m = store.manifest
    if cfg.model != m.get("model"):
        line = f"--model {cfg.model!r} but the store {store.folder} was collected from {m.get('model')!r}"
        if not cfg.allow_mismatch:
            raise ValueError(f"{line}: pass the store's model, or --allow_mismatch")
        logger.warning("%s (--allow_mismatch)", line)
        warnings.append(line)
    loaded = load_model(cfg.model, int(m["target_layer"]), cfg.dtype, cfg.device, all_layers=True)
    if loaded.d_model != sae.d_in:
        raise ValueError(f"--model {cfg.model!r} has d_model {loaded.d_model} but the SAE reads "
                         f"d_in={sae.d_in}: pass the model the SAE was trained on")
    return loaded


def store_tokenizer(manifest: dict):
    """The store's tokenizer (its model's), or None when it cannot be loaded here."""
    from transformers import AutoTokenizer

    from saetron.collect.model import resolve_model

    try:
        path, gguf_file = resolve_model(manifest["model"])
        return AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    except Exception as error:  # an offline hub id, a removed folder: the report shows token ids
        logger.warning("cannot load the store's tokenizer %r (%s): the report shows token ids",
                       manifest.get("model"), error)
        return None


def final_norm_weight(model) -> Tensor | None:
    """The weight [d_model] of the decoder's final norm (`norm`, `ln_f` or `final_layernorm`), or None."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in ("norm", "ln_f", "final_layernorm"):
        weight = getattr(getattr(decoder, name, None), "weight", None)
        if isinstance(weight, Tensor):
            return weight.detach()
    return None


def _report_summary(cfg: EvalConfig, sae, store: ActivationStore, r: dict) -> list[tuple[str, str]]:
    k = f" k={sae.cfg.k}" if sae.cfg.k else ""
    rows = [("SAE", f"{cfg.sae} (d_in {sae.d_in}, d_sae {sae.d_sae}, {sae.cfg.activation}{k})"),
            ("store", f"{cfg.data_dir}, shards {shard_range(store)}, {r['tokens']:,} tokens"),
            ("held out", f"{r['held_out']}: {r['why']}"),
            ("explained variance", f"{r['explained_variance']:.4f} (rows under {cfg.outlier_factor:g}x the "
                                   f"median norm: {r['explained_variance_typical']:.4f})"),
            ("L0", f"{r['l0']:.2f}"), ("dead", f"{100 * r['dead_fraction']:.2f}%")]
    if "ce_loss_recovered" in r:
        rows += [("CE loss recovered", f"{r['ce_loss_recovered']:.4f} (clean {r['ce_loss_clean']:.4f}, "
                                       f"spliced {r['ce_loss_spliced']:.4f}, zero {r['ce_loss_zero']:.4f})"),
                 ("KL to the clean model", f"{r['kl_spliced']:.4f} nats per token")]
    return rows


def run(cfg: EvalConfig) -> dict:
    """Evaluate cfg.sae on cfg.data_dir (and cfg.model); writes metrics.json, the plots, the report."""
    from saetron.sae import SparseAutoencoder

    from . import plots

    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sae = SparseAutoencoder.load(cfg.sae, device=device, backend=cfg.backend)
    store = open_store(cfg.data_dir, cfg.first_shard, cfg.num_shards)
    trained = trained_on(cfg.sae)
    warnings = check_store(sae.d_in, cfg.sae, trained, store, cfg.allow_mismatch)
    loaded = _load_model(cfg, sae, store, warnings) if cfg.model else None
    held = held_out(trained, store, min(store.total_tokens, cfg.max_tokens or store.total_tokens))
    if held["held_out"] is not True:
        logger.warning("these rows are %s held out: %s", "not" if held["held_out"] is False else "maybe not",
                       held["why"])

    t0 = time.perf_counter()
    metrics, stats = evaluate_reconstruction(sae, store_batches(store, cfg.batch_size, cfg.max_tokens),
                                             outlier_factor=cfg.outlier_factor,
                                             top_k=cfg.report_examples if cfg.report else 0)
    logger.info("reconstruction: %d rows in %.1f s", metrics["tokens"], time.perf_counter() - t0)
    if loaded is not None:
        t0 = time.perf_counter()
        metrics.update(_model_metrics(cfg, sae, trained, store, loaded))
        logger.info("model with the SAE spliced in: %d windows x 3 forwards in %.1f s", metrics["windows"],
                    time.perf_counter() - t0)
    png = {"density": plots.density_png(stats.log10_density().numpy(), stats.rows),
           "L0": plots.l0_png(metrics["l0_histogram"], metrics["l0"])}
    (out_dir / "density.png").write_bytes(png["density"])
    (out_dir / "l0_hist.png").write_bytes(png["L0"])
    m = store.manifest
    result = {
        **metrics, **held,
        "sae": str(cfg.sae), "d_in": sae.d_in, "d_sae": sae.d_sae, "activation": sae.cfg.activation,
        "k": sae.cfg.k,
        "store": {"data_dir": str(cfg.data_dir), "shards": store.shard_files, "model": m.get("model"),
                  "target_layer": m.get("target_layer"), "hook_point": m.get("hook_point"),
                  "dataset": m.get("dataset")},
        "trained_on": trained.to_dict(), "warnings": warnings, "definitions": DEFINITIONS,
        "config": cfg.to_dict(),
    }
    if cfg.report:
        from .report import write_report

        t0 = time.perf_counter()
        path = out_dir / "report" / "index.html"
        model = loaded.model if loaded is not None else None
        write_report(path, sae, store, stats, loaded.tokenizer if loaded else store_tokenizer(m),
                     top=cfg.report_top, rare=cfg.report_rare, examples_context=cfg.report_context,
                     seed=cfg.seed, summary=_report_summary(cfg, sae, store, result), plots=png,
                     unembed=model.get_output_embeddings().weight.detach() if model is not None else None,
                     norm_weight=final_norm_weight(model) if model is not None else None)
        result["report"] = str(path)
        logger.info("report: %s in %.1f s", path, time.perf_counter() - t0)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
