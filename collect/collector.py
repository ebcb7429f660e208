"""The collection loop: batches of windows -> hooked truncated forward -> kept rows -> async shard writer."""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm

from .config import CollectConfig
from .data import open_text_stream
from .model import LayerHook, LoadedModel, load_model
from .packing import BatchProducer
from .store import check_resumable, new_manifest, prepare_output_dir, read_manifest
from .writer import ShardWriter

logger = logging.getLogger(__name__)


def collect(config: CollectConfig, loaded: LoadedModel | None = None) -> dict:
    """Run (or resume) one collection into `config.output_dir`; returns the final manifest.

    `loaded`: the model of `config.model` already loaded with at least `target_layer + 1` layers
    (tests and benchmarks load it once); None: load it here.
    """
    prepare_output_dir(config.output_dir)  # before the slow model load: fail fast
    stored = read_manifest(config.output_dir)
    if loaded is None:
        loaded = load_model(config.model, config.target_layer, config.dtype, config.device, config.revision)
    manifest = new_manifest(
        model=config.model, revision=loaded.revision, target_layer=config.target_layer,
        hook_point=config.hook_point, d_model=loaded.d_model, dtype=loaded.dtype,
        context_size=config.context_size, keep_special_tokens=config.keep_special_tokens,
        dataset=config.dataset, split=config.split, text_field=config.text_field,
        tokenizer=getattr(loaded.tokenizer, "name_or_path", config.model),
    )
    start = None
    if stored is not None:
        check_resumable(config.output_dir, stored, manifest)
        manifest, start = stored, stored["stream_state"]
        logger.info("resuming %s after %d shards, %d tokens", config.output_dir, len(manifest["shards"]),
                    manifest["total_tokens"])
    if manifest["total_tokens"] >= config.max_tokens:
        logger.info("%s already holds %d >= max_tokens %d tokens: nothing to do", config.output_dir,
                    manifest["total_tokens"], config.max_tokens)
        return manifest

    producer = BatchProducer(
        open_text_stream(config.dataset, config.split, config.dataset_config), loaded.tokenizer,
        config.context_size, config.batch_size, config.text_field, config.keep_special_tokens, start,
        pin=loaded.device.type == "cuda",
    )
    writer = ShardWriter(
        config.output_dir, manifest, capacity=config.shard_tokens + config.batch_size * config.context_size,
        d_model=loaded.d_model, dtype=loaded.dtype, device=loaded.device, num_buffers=config.num_buffers,
    )
    total, state = manifest["total_tokens"], start
    bar = tqdm(total=config.max_tokens, initial=total, unit="tok", unit_scale=True, desc="collect",
               disable=not sys.stderr.isatty())
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
                bar.update(len(keep_idx))
                bar.set_postfix(written=f"{writer.bytes_written / 1e6:,.0f} MB", refresh=False)
                if total >= config.max_tokens:
                    break
        writer.finish(state)
    except BaseException:
        writer.abort()  # the shards already handed over are still written
        raise
    finally:
        producer.close()
        bar.close()
    if total < config.max_tokens:
        logger.info("the dataset ended after %d tokens (max_tokens %d)", total, config.max_tokens)
    logger.info("store %s: %d shards, %d tokens, %.1f MB written by this run", config.output_dir,
                len(manifest["shards"]), manifest["total_tokens"], writer.bytes_written / 1e6)
    return manifest

