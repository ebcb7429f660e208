"""The collection loop: windows -> hooked truncated forward -> kept rows of every site -> shard writer.

One site (a layer and a hook point) writes its store straight into --output_dir. Several sites
(`--target_layer 6,12,18` and/or `--hook_point resid_post,mlp_out`) share each forward pass of the model,
truncated after the deepest layer, and write one store per site, OUTPUT_DIR/layer_L.HOOK_POINT/, each the
store a one-site run of that site writes, byte for byte: the same rows, shards and manifest.

A run holds the locks (lock.py) of --output_dir and of every site's folder from before it reads a
manifest to its end. It resumes after the last shard the stores share, when they were written with the
same settings: a crash between two sites' manifests leaves one site a shard ahead, and that shard is
dropped first. It returns at once, without loading the model, when the stores already hold what was
asked (max_tokens reached or the dataset ended): a no-op re-run costs a manifest read and a header check
per shard.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
import time
from contextlib import ExitStack

import torch
from tqdm import tqdm

from .cli import format_seconds
from .config import CollectConfig, Site, site_folder
from .data import open_text_stream
from .lock import StoreLock
from .model import LayerHook, LoadedModel, load_model, stored_dtype
from .packing import BatchProducer
from .repair import first_bad_shard, truncate_store
from .store import MANIFEST, StoreError, dtype_name, new_manifest, read_manifest, write_manifest
from .writer import ShardWriter

logger = logging.getLogger(__name__)

# Settings a resumed run must share with its store (the stream state is only valid for the same text).
# The first group is known before the model loads; the second comes from the loaded model.
SETTINGS_KNOWN_EARLY = ("model", "target_layer", "hook_point", "dtype", "context_size", "dataset", "split")
SETTINGS_FROM_MODEL = ("revision", "d_model", "tokenizer")
SITE_GLOB = "layer_*.*"


def collect(config: CollectConfig, loaded: LoadedModel | None = None) -> dict:
    """Run (or resume) one collection into `config.output_dir`. Returns the final manifest (one site), or
    {site folder name: manifest} (several sites, e.g. {"layer_12.resid_post": {...}}).

    `loaded`: the model of `config.model` already loaded with at least `deepest_layer + 1` layers
    (tests and benchmarks load it once); None: load it here, unless the stores are already complete.
    """
    sites = config.sites
    several = len(sites) > 1
    folders = [site_folder(config.output_dir, site) for site in sites] if several else [config.output_dir]
    prepare_output_dir(config.output_dir)  # before the slow model load: fail fast
    check_layout(config.output_dir, several)
    for folder in folders:
        prepare_output_dir(folder)
    with ExitStack() as locks:
        for folder in dict.fromkeys([config.output_dir, *folders]):
            locks.enter_context(StoreLock(folder))
        stored = []
        for site, folder in zip(sites, folders):
            remove_temporaries(folder)
            manifest = read_manifest(folder) if os.path.exists(os.path.join(folder, MANIFEST)) else None
            if manifest is not None and manifest["shards"]:
                check_settings(folder, manifest, early_settings(config, site), SETTINGS_KNOWN_EARLY)
                check_shards(config.output_dir if several else folder, folder, manifest)
            stored.append(manifest)
        align_sites(config.output_dir, folders, stored)
        stored = [m if m is not None and m["shards"] else None for m in stored]  # empty: binds no setting
        if stored[0] is not None and (rows_seen(stored[0]) >= config.max_tokens or stored[0]["stream_ended"]):
            logger.info("%s already holds %d tokens (max_tokens %d%s): nothing to do", config.output_dir,
                        stored[0]["total_tokens"], config.max_tokens,
                        ", the dataset ended" if stored[0]["stream_ended"] else "")
            return result(folders, stored)
        if loaded is None:
            loaded = load_model(config.model, config.deepest_layer, config.dtype, config.device,
                                config.revision, device_map=config.device_map)
        manifests = []
        for site, folder, manifest in zip(sites, folders, stored):
            fresh = new_manifest(
                model=config.model, revision=loaded.revision, target_layer=site[0], hook_point=site[1],
                d_model=loaded.d_model, dtype=store_dtype(config, loaded), context_size=config.context_size,
                keep_special_tokens=config.keep_special_tokens, dataset=config.dataset, split=config.split,
                text_field=config.text_field,
                tokenizer=getattr(loaded.tokenizer, "name_or_path", config.model),
            )
            if manifest is None:
                if several:  # an empty store: the site is part of this run from now on
                    write_manifest(folder, fresh)
                manifests.append(fresh)
            else:
                check_settings(folder, manifest, fresh, SETTINGS_FROM_MODEL)
                manifests.append(manifest)
        if stored[0] is not None and stored[0]["shards"]:
            logger.info("resuming %s after %d shards, %d tokens", config.output_dir,
                        len(manifests[0]["shards"]), manifests[0]["total_tokens"])
        return run(config, loaded, folders, manifests)


def store_dtype(config: CollectConfig, loaded: LoadedModel) -> torch.dtype:
    """What the stores hold: float8_e4m3fn when asked, else the model's compute dtype."""
    return torch.float8_e4m3fn if config.dtype == "float8_e4m3fn" else loaded.dtype


def rows_seen(manifest: dict) -> int:
    """Rows the collection produced so far, those left out as non-finite included: the same for every site
    of a run (the stop rule counts these, so each site stops where its one-site run would)."""
    return manifest["total_tokens"] + sum(entry["nonfinite_rows"] for entry in manifest["shards"])


def result(folders: list[str], manifests: list[dict]) -> dict:
    if len(folders) == 1:
        return manifests[0]
    return {os.path.basename(folder): manifest for folder, manifest in zip(folders, manifests)}


def run(config: CollectConfig, loaded: LoadedModel, folders: list[str], manifests: list[dict]) -> dict:
    """The loop itself, from the stream state the stores share until max_tokens or the dataset's end."""
    start = manifests[0]["stream_state"]
    producer = BatchProducer(
        open_text_stream(config.dataset, config.split, config.dataset_config), loaded.tokenizer,
        config.context_size, config.batch_size, config.text_field, config.keep_special_tokens, start,
        pin=loaded.device.type == "cuda",
    )
    batch_rows = config.batch_size * config.context_size
    writer = ShardWriter(
        list(zip(folders, manifests)), batch_rows=batch_rows, shard_rows=config.shard_tokens + batch_rows,
        d_model=loaded.d_model, dtype=store_dtype(config, loaded), device=loaded.device,
        num_buffers=config.num_buffers, describe_token=lambda token_id: loaded.tokenizer.decode([token_id]),
    )
    seen, state = rows_seen(manifests[0]), start
    progress = Progress(config, seen)
    try:
        with LayerHook(loaded.layers, config.target_layer, config.hook_point) as hook:
            for batch in producer:
                input_ids = batch.input_ids.to(loaded.device, non_blocking=True)  # [B, T]
                activations = hook.capture(loaded.model, input_ids)  # per site [B, T, d_model]
                writer.append(activations, batch.token_ids, batch.positions, keep_idx=batch.keep_idx)
                if manifests[0]["text_field"] is None:  # resolved by the tokenizer thread
                    for manifest in manifests:
                        manifest["text_field"] = producer.info["text_field"]
                seen, state = seen + len(batch.keep_idx), batch.stream_state
                if writer.rows >= config.shard_tokens:
                    writer.close_shard(state)
                progress.update(seen, writer.bytes_written)
                if seen >= config.max_tokens:
                    break
        writer.finish(state)
    except BaseException:
        writer.abort()  # the shards already handed over are still written
        raise
    finally:
        producer.close()
        progress.close()
    if seen < config.max_tokens:
        logger.info("the dataset ended after %d tokens (max_tokens %d)", seen, config.max_tokens)
        for folder, manifest in zip(folders, manifests):
            manifest["stream_ended"] = True
            write_manifest(folder, manifest)
    if writer.nonfinite_rows:
        logger.warning("left out %d row(s) with NaN/Inf activations in all (counted per shard in %s)",
                       writer.nonfinite_rows, MANIFEST)
    logger.info("%s: %d store(s), %d shards, %d tokens each, %.1f MB written by this run", config.output_dir,
                len(folders), len(manifests[0]["shards"]), manifests[0]["total_tokens"],
                writer.bytes_written / 1e6)
    return result(folders, manifests)


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


def early_settings(config: CollectConfig, site: Site) -> dict:
    """The SETTINGS_KNOWN_EARLY of this run's `site`, without loading the model (dtype `auto` resolved as
    load_model will)."""
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return {"model": config.model, "target_layer": site[0], "hook_point": site[1],
            "dtype": dtype_name(stored_dtype(config.dtype, device)), "context_size": config.context_size,
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


def check_shards(repair_dir: str, folder: str, stored: dict) -> None:
    """Refuse to extend a store with a missing, truncated or foreign shard; say how to repair it."""
    bad = first_bad_shard(folder, stored)
    if bad is not None:
        raise StoreError(f"{bad[1]}. Nothing was deleted: `python -m saetron.collect --repair {repair_dir}` "
                         "drops it and the shards after it, then this command resumes after the last good "
                         "shard; or use a new --output_dir")


def check_layout(output_dir: str, several: bool) -> None:
    """Refuse a one-site run into a folder of site stores, and a multi-site run into a store."""
    if several and os.path.exists(os.path.join(output_dir, MANIFEST)):
        raise StoreError(f"{output_dir} holds one store ({MANIFEST}); a run of several layers or hook points "
                         "writes a store per site into subfolders: pick a new --output_dir")
    found = sorted(os.path.basename(os.path.dirname(p))
                   for p in glob.glob(os.path.join(output_dir, SITE_GLOB, MANIFEST)))
    if not several and found:
        raise StoreError(f"{output_dir} holds the stores of a run of several sites ({', '.join(found)}); "
                         "give that run's --target_layer and --hook_point to resume it, --output_dir "
                         f"{os.path.join(output_dir, found[0])} for one of them, or a new --output_dir")


def align_sites(output_dir: str, folders: list[str], stored: list[dict | None]) -> None:
    """Bring the stores of a multi-site run back to the shards they all hold (in place).

    A crash between two sites' manifests leaves a site one shard ahead (a repair can leave it further
    ahead): its extra shards are dropped, so that one forward pass feeds every store again. A site with
    no shard while another holds shards: refused when its folder has no manifest (it was not part of that
    run: a run writes every site's empty manifest before its first forward), else it starts from nothing
    and so do the others."""
    if len(folders) == 1:
        return
    if any(m is None for m in stored):
        if any(m is not None and m["shards"] for m in stored):
            missing = [os.path.basename(f) for f, m in zip(folders, stored) if m is None]
            present = [os.path.basename(f) for f, m in zip(folders, stored) if m is not None]
            raise StoreError(f"{output_dir} holds the stores {present} but not {missing}: it was collected "
                             "with other sites; give that run's --target_layer and --hook_point, or use a "
                             "new --output_dir")
        return
    keep = min(len(m["shards"]) for m in stored)
    for folder, manifest in zip(folders, stored):
        if len(manifest["shards"]) > keep:
            logger.warning("%s holds %d shards, the other sites %d (a crash or a repair between them): "
                           "dropping its last %d so that every site resumes from the same text", folder,
                           len(manifest["shards"]), keep, len(manifest["shards"]) - keep)
            truncate_store(folder, manifest, keep)
    if len({json.dumps(m["stream_state"], sort_keys=True) for m in stored}) > 1:
        raise StoreError(f"the stores under {output_dir} hold {keep} shards each but of different text "
                         "(their stream states differ): they were not collected together; use a new "
                         "--output_dir")
    if any(m["stream_ended"] for m in stored) and not all(m["stream_ended"] for m in stored):
        for folder, manifest in zip(folders, stored):  # a crash while the last manifests were rewritten
            manifest["stream_ended"] = True
            write_manifest(folder, manifest)


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
