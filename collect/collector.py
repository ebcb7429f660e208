"""The collection loop: batches of windows -> hooked truncated forward -> kept rows -> async shard writer.

A run holds the store's lock (lock.py) from before it reads the manifest to its end. It resumes a store
after its last shard when the store was written with the same settings, and returns at once, without
loading the model, when the store already holds what was asked (max_tokens reached or the dataset
ended): a no-op re-run costs a manifest read and a header check per shard.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
import time

import torch
from tqdm import tqdm

from .cli import format_seconds
from .config import CollectConfig
from .data import open_text_stream
from .lock import StoreLock
from .model import LayerHook, LoadedModel, load_model, pick_dtype
from .packing import BatchProducer
from .repair import first_bad_shard
from .store import MANIFEST, StoreError, dtype_name, new_manifest, read_manifest, write_manifest
from .writer import ShardWriter

logger = logging.getLogger(__name__)

# Settings a resumed run must share with its store (the stream state is only valid for the same text).
# The first group is known before the model loads; the second comes from the loaded model.
SETTINGS_KNOWN_EARLY = ("model", "target_layer", "hook_point", "dtype", "context_size", "dataset", "split")
SETTINGS_FROM_MODEL = ("revision", "d_model", "tokenizer")


def collect(config: CollectConfig, loaded: LoadedModel | None = None) -> dict:
    """Run (or resume) one collection into `config.output_dir`; returns the final manifest.

    `loaded`: the model of `config.model` already loaded with at least `target_layer + 1` layers
    (tests and benchmarks load it once); None: load it here, unless the store is already complete.
    """
    prepare_output_dir(config.output_dir)  # before the slow model load: fail fast
    with StoreLock(config.output_dir):
        remove_temporaries(config.output_dir)
        stored = read_manifest(config.output_dir) if os.path.exists(
            os.path.join(config.output_dir, MANIFEST)) else None
        if stored is not None:
            check_settings(config.output_dir, stored, early_settings(config), SETTINGS_KNOWN_EARLY)
            check_shards(config.output_dir, stored)
            if stored["total_tokens"] >= config.max_tokens or stored["stream_ended"]:
                logger.info("%s already holds %d tokens (max_tokens %d%s): nothing to do", config.output_dir,
                            stored["total_tokens"], config.max_tokens,
                            ", the dataset ended" if stored["stream_ended"] else "")
                return stored
        if loaded is None:
            loaded = load_model(config.model, config.target_layer, config.dtype, config.device,
                                config.revision)
        manifest = new_manifest(
            model=config.model, revision=loaded.revision, target_layer=config.target_layer,
            hook_point=config.hook_point, d_model=loaded.d_model, dtype=loaded.dtype,
            context_size=config.context_size, keep_special_tokens=config.keep_special_tokens,
            dataset=config.dataset, split=config.split, text_field=config.text_field,
            tokenizer=getattr(loaded.tokenizer, "name_or_path", config.model),
        )
        if stored is not None:
            check_settings(config.output_dir, stored, manifest, SETTINGS_FROM_MODEL)
            manifest = stored
            logger.info("resuming %s after %d shards, %d tokens", config.output_dir, len(manifest["shards"]),
                        manifest["total_tokens"])
        return run(config, loaded, manifest)


def run(config: CollectConfig, loaded: LoadedModel, manifest: dict) -> dict:
    """The loop itself, from `manifest`'s stream state until max_tokens or the dataset's end."""
    start = manifest["stream_state"]
    producer = BatchProducer(
        open_text_stream(config.dataset, config.split, config.dataset_config), loaded.tokenizer,
        config.context_size, config.batch_size, config.text_field, config.keep_special_tokens, start,
        pin=loaded.device.type == "cuda",
    )
    writer = ShardWriter(
        config.output_dir, manifest, capacity=config.shard_tokens + config.batch_size * config.context_size,
        d_model=loaded.d_model, dtype=loaded.dtype, device=loaded.device, num_buffers=config.num_buffers,
        describe_token=lambda token_id: loaded.tokenizer.decode([token_id]),
    )
    total, state = manifest["total_tokens"], start
    progress = Progress(config, total)
    try:
        with LayerHook(loaded.layers, config.target_layer, config.hook_point) as hook:
            for batch in producer:
                input_ids = batch.input_ids.to(loaded.device, non_blocking=True)  # [B, T]
                activations = hook.run(loaded.model, input_ids)  # [B, T, d_model]
                keep_idx = batch.keep_idx.to(activations.device, non_blocking=True)  # [n]
                rows = activations.flatten(0, 1).index_select(0, keep_idx)  # [n, d_model]
                writer.append(rows, batch.token_ids, batch.positions)
                if manifest["text_field"] is None:  # resolved by the tokenizer thread
                    manifest["text_field"] = producer.info["text_field"]
                total, state = total + len(keep_idx), batch.stream_state
                if writer.rows >= config.shard_tokens:
                    writer.close_shard(state)
                progress.update(total, writer.bytes_written)
                if total >= config.max_tokens:
                    break
        writer.finish(state)
    except BaseException:
        writer.abort()  # the shards already handed over are still written
        raise
    finally:
        producer.close()
        progress.close()
    if total < config.max_tokens:
        logger.info("the dataset ended after %d tokens (max_tokens %d)", total, config.max_tokens)
        manifest["stream_ended"] = True
        write_manifest(config.output_dir, manifest)
    if writer.nonfinite_rows:
        logger.warning("left out %d row(s) with NaN/Inf activations in all (counted per shard in %s)",
                       writer.nonfinite_rows, MANIFEST)
    logger.info("store %s: %d shards, %d tokens, %.1f MB written by this run", config.output_dir,
                len(manifest["shards"]), manifest["total_tokens"], writer.bytes_written / 1e6)
    return manifest


class Progress:
    """A tqdm bar on a terminal; elsewhere (nohup, SLURM, CI) one log line every `log_every_seconds`:
    `collect: 1,234,567 / 10,000,000 tokens (12.3%) | 45,210 tok/s | 2,345 MB written | ETA 3m 14s`."""

    def __init__(self, config: CollectConfig, total: int) -> None:
        self.goal, self.every, self.first = config.max_tokens, config.log_every_seconds, total
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=self.goal, initial=total, unit="tok", unit_scale=True, desc="collect",
                        disable=not self.tty)
        self.start = self.last = time.perf_counter()
        self.total = total

    def update(self, total: int, bytes_written: int) -> None:
        self.bar.update(total - self.total)
        self.total = total
        self.bar.set_postfix(written=f"{bytes_written / 1e6:,.0f} MB", refresh=False)
        now = time.perf_counter()
        if self.tty or now - self.last < self.every:
            return
        self.last = now
        rate = (total - self.first) / max(now - self.start, 1e-9)
        eta = (self.goal - total) / rate if rate > 0 else float("inf")
        logger.info("collect: %s / %s tokens (%.1f%%) | %s tok/s | %s MB written | ETA %s", f"{total:,}",
                    f"{self.goal:,}", 100 * total / self.goal, f"{rate:,.0f}", f"{bytes_written / 1e6:,.0f}",
                    format_seconds(eta))

    def close(self) -> None:
        self.bar.close()


def early_settings(config: CollectConfig) -> dict:
    """The SETTINGS_KNOWN_EARLY of this run, without loading the model (dtype `auto` resolved as
    load_model will)."""
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return {"model": config.model, "target_layer": config.target_layer, "hook_point": config.hook_point,
            "dtype": dtype_name(pick_dtype(config.dtype, device)), "context_size": config.context_size,
            "dataset": config.dataset, "split": config.split, "text_field": config.text_field,
            "keep_special_tokens": config.keep_special_tokens}


def check_settings(output_dir: str, stored: dict, wanted: dict, keys: tuple[str, ...]) -> None:
    """Refuse to extend (or call complete) a store written with other settings."""
    pairs = [(key, stored[key], wanted[key]) for key in keys]
    if "keep_special_tokens" in wanted:
        pairs.append(("keep_special_tokens", stored["special_token_policy"]["keep_special_tokens"],
                      wanted["keep_special_tokens"]))
    if wanted.get("text_field") is not None:  # None: whatever the store resolved
        pairs.append(("text_field", stored["text_field"], wanted["text_field"]))
    for key, have, want in pairs:
        if have != want:
            raise StoreError(f"{output_dir} holds {key}={have!r} but this run has {key}={want!r}: run with "
                             "the store's settings to resume it, or pick a new --output_dir")


def check_shards(output_dir: str, stored: dict) -> None:
    """Refuse to extend a store with a missing, truncated or foreign shard; say how to repair it."""
    bad = first_bad_shard(output_dir, stored)
    if bad is not None:
        raise StoreError(f"{bad[1]}. Nothing was deleted: `python -m saetron.collect --repair {output_dir}` "
                         "drops it and the shards after it, then this command resumes after the last good "
                         "shard; or use a new --output_dir")


def prepare_output_dir(output_dir: str) -> None:
    """Create `output_dir` and prove it writable."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write_probe_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise StoreError(f"--output_dir {output_dir} is not a writable folder ({error}); pick another") \
            from error


def remove_temporaries(output_dir: str) -> None:
    """Drop the temporaries an interrupted run left (never complete); only under the store's lock."""
    for tmp in glob.glob(os.path.join(output_dir, "*.tmp")):
        logger.warning("removing %s, an incomplete file from an interrupted run", tmp)
        os.remove(tmp)
