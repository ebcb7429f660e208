"""The store reader: exact rows in every stored dtype, a seeded shuffle, disjoint per-rank parts."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_support import write_store

from saetron.sae.data import ActivationStore, BatchLoader, ShuffleOrder, stats_batches

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rows_read_back_bit_exact(tmp_path, dtype):
    store_dir = write_store(tmp_path, [700, 333, 1200], d_model=20, dtype=dtype)
    store = ActivationStore(store_dir)
    stored = torch.cat([load_file(store_dir / f"shard_{i:05d}.safetensors")["activations"] for i in range(3)])
    rows = np.random.default_rng(0).permutation(store.total_tokens)[:500]
    got = store.gather(rows, torch.empty(500, 20, dtype=store.dtype))
    assert store.dtype == dtype and torch.equal(got, stored[torch.from_numpy(rows)])


def test_shuffle_is_seeded_and_ranks_split_each_global_batch(tmp_path):
    store = ActivationStore(write_store(tmp_path, [3000, 1100, 2900], d_model=8))
    order = ShuffleOrder(store.starts, shuffle_buffer=2048, seed=5)
    epoch0 = order.rows(0, 0, store.total_tokens)
    assert sorted(epoch0.tolist()) == list(range(store.total_tokens))  # every row once per epoch
    # A buffer as big as the store (8 chunks) mixes all three shards into the first batch.
    first = ShuffleOrder(store.starts, shuffle_buffer=8192, seed=5).rows(0, 0, 256)
    assert len(np.unique(np.searchsorted(store.starts, first, side="right"))) == 3
    assert not np.array_equal(order.rows(1, 0, 256), epoch0[:256])
    assert np.array_equal(ShuffleOrder(store.starts, 2048, seed=5).rows(0, 1000, 1500), epoch0[1000:1500])

    batch, world = 600, 3  # batches cross the 2048-row buffers
    whole = [x for x in BatchLoader(store, order, batch, 0, 1, 9, 13, CPU)]  # steps 9..12 span epoch 0 -> 1
    parts = [[x for x in BatchLoader(store, order, batch, r, world, 9, 13, CPU)] for r in range(world)]
    for step in range(4):
        assert torch.equal(torch.cat([parts[r][step] for r in range(world)]), whole[step])
    assert sum(1 for _ in stats_batches(store, order, 10_000, rows_per_read=4096)) == 2
