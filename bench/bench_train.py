"""Trainer throughput: tokens/s of training steps fed from the activation store against the same steps
on the same batches already in memory.

    .venv/bin/python -m pytest bench/bench_train.py

The pilot's shape (d_model 576 as SmolLM2-135M, d_sae 4608, TopK k=32, bf16 store, 4096-token batches)
on CPU in fp32; d=7168, d_sae=57344, k=64 in bf16 on a GPU. The overhead of loading is
store_seconds / memory_seconds - 1 (target < 5% on CPU), both timed in this run, rounds interleaved,
best round of each.
"""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from saetron.sae.config import SAEConfig
from saetron.sae.data import ActivationStore, BatchLoader, ShuffleOrder
from saetron.sae.distributed import init_distributed, shard_model, shutdown_distributed
from saetron.sae.model import SparseAutoencoder
from saetron.sae.optim import SAEAdam
from saetron.sae.train import train_step
from saetron.sae.train_config import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from train_support import write_store  # noqa: E402

CUDA = torch.cuda.is_available()
# CPU: 4 steps of ~1.3 s each at the pilot's shape on 2 cores; GPU: the design card's production shape.
D_MODEL, D_SAE, K, BATCH, STEPS = (7168, 57344, 64, 16384, 20) if CUDA else (576, 4608, 32, 4096, 4)
SHARDS, SHARD_TOKENS = (8, 65536) if CUDA else (4, 8192)
ROUNDS = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    store_dir = write_store(tmp_path_factory.mktemp("store"), [SHARD_TOKENS] * SHARDS, d_model=D_MODEL,
                            dtype=torch.bfloat16, n_features=256, active=16.0)
    env = init_distributed()
    cfg = TrainConfig(data_dir=str(store_dir), output_dir=str(tmp_path_factory.mktemp("out")), d_sae=D_SAE,
                      activation="topk", k=K, batch_size=BATCH, lr=1e-3)
    store = ActivationStore(store_dir)
    order = ShuffleOrder(store.starts, cfg.shuffle_buffer, cfg.seed)
    torch.manual_seed(0)
    model = SparseAutoencoder.from_config(SAEConfig(D_MODEL, d_sae=D_SAE, activation="topk", k=K))
    compute = torch.bfloat16 if CUDA else torch.float32
    shard_model(model.to(env.device), env, compute)
    optimizer = SAEAdam(model, lr=cfg.lr)
    yield cfg, store, order, model, optimizer, env
    shutdown_distributed(env, completed=True)


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _info(benchmark) -> None:
    tokens = STEPS * BATCH
    benchmark.extra_info["tokens_per_s"] = tokens / benchmark.stats.stats.min  # tokens / best seconds
    benchmark.extra_info["shape"] = f"d_model={D_MODEL} d_sae={D_SAE} k={K} batch={BATCH} steps={STEPS}"
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if CUDA else "cpu"
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    benchmark.extra_info["commit"] = git.stdout.strip()


def test_train_tokens_per_s(benchmark, setup):
    """Timed: the steps fed by the store's loader. Before each timed round, untimed by the benchmark but
    by the clock: the same steps on the same batches from memory, so both see the same machine load."""
    cfg, store, order, model, optimizer, env = setup
    make = lambda: BatchLoader(store, order, BATCH, env.rank, env.world_size, 0, STEPS, env.device)
    in_memory = [x.to(env.device) for x in (make().read(s) for s in range(STEPS))]
    memory_seconds, loaders = [], []

    def run(batches):
        for step, x in enumerate(batches):
            train_step(model, optimizer, x, cfg, step, cfg.lr)
        _sync()

    def run_in_memory():
        start = time.perf_counter()
        run(in_memory)
        memory_seconds.append(time.perf_counter() - start)

    run(make())  # warm-up: allocator, page cache, kernels
    def run_from_store():
        loaders.append(make())
        run(loaders[-1])

    benchmark.pedantic(run_from_store, setup=run_in_memory, rounds=ROUNDS, iterations=1)
    _info(benchmark)
    store_s, memory_s = benchmark.stats.stats.min, min(memory_seconds)
    overhead = store_s / memory_s - 1  # the loading's cost relative to the steps alone, best rounds
    benchmark.extra_info["tokens_per_s_in_memory"] = STEPS * BATCH / memory_s
    benchmark.extra_info["loading_overhead"] = overhead
    # Load-independent: the share of the store rounds the training loop spent waiting for a batch.
    waited = sum(loader.wait_seconds for loader in loaders) / sum(benchmark.stats.stats.data)
    benchmark.extra_info["loader_wait_fraction"] = waited
    tokens = STEPS * BATCH
    print(f"\nloading overhead {100 * overhead:+.2f}%, waiting for batches {100 * waited:.2f}% of the "
          f"time: {tokens / store_s:,.0f} tokens/s from the store, {tokens / memory_s:,.0f} in memory "
          f"(best of {ROUNDS} rounds of {STEPS} steps of {BATCH} tokens)")
