"""The store's public reader (what an evaluation uses): rows in store order with their token ids and
positions, bit-exact in every stored dtype; global row ids located in their shard."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from saetron.collect.store import ActivationStore, new_manifest, row_norms, write_shard


def write(folder, sizes: list[int], dtype: torch.dtype, d_model: int = 12) -> list[dict]:
    manifest = new_manifest(model="m", revision="r", target_layer=0, hook_point="resid_post",
                            d_model=d_model, dtype=dtype, context_size=32, keep_special_tokens=False,
                            dataset="d", split="train", text_field="text", tokenizer="t")
    g = torch.Generator().manual_seed(0)
    for i, n in enumerate(sizes):
        x = torch.randn(n, d_model, generator=g).to(dtype)
        ids = torch.randint(0, 500, (n,), generator=g, dtype=torch.int32)
        positions = torch.arange(n, dtype=torch.int32) % 31 + 1
        write_shard(folder, manifest, x, ids, positions, row_norms(x), {"i": i})
    return [load_file(folder / f"shard_{i:05d}.safetensors") for i in range(len(sizes))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_iter_rows_gives_every_row_in_order(tmp_path, dtype):
    shards = write(tmp_path, [70, 33, 100], dtype)
    store = ActivationStore(tmp_path)
    parts = list(store.iter_rows(rows_per_read=40))
    assert [(p.shard, p.start, len(p.token_ids)) for p in parts] == \
        [(0, 0, 40), (0, 40, 30), (1, 0, 33), (2, 0, 40), (2, 40, 40), (2, 80, 20)]
    for key in ("activations", "token_ids", "positions"):
        got = torch.cat([getattr(p, key) for p in parts])
        want = torch.cat([s[key] for s in shards])
        assert got.dtype == want.dtype and torch.equal(got, want), key
    assert store.total_tokens == 203 and store.dtype == dtype


def test_locate_and_gather(tmp_path):
    shards = write(tmp_path, [70, 33], torch.float32)
    store = ActivationStore(tmp_path, num_shards=2)
    shard, row = store.locate(75)
    assert (shard.path.name, row) == ("shard_00001.safetensors", 5)
    rows = np.array([75, 3, 102, 0])
    got = store.gather(rows, torch.empty(4, 12))
    assert torch.equal(got, torch.cat([shards[0]["activations"], shards[1]["activations"]])[rows])


def test_shard_range_read_and_windows(tmp_path):
    """first_shard/num_shards choose a range of shards; `read` spans shards; `window_of` finds the rows of
    a context window from the positions (write() numbers positions 1..31 cyclically, shards of 70, 33, 100
    rows restart them)."""
    shards = write(tmp_path, [70, 33, 100], torch.float32)
    store = ActivationStore(tmp_path, num_shards=2, first_shard=1)
    assert store.total_tokens == 133
    assert store.shard_files == ["shard_00001.safetensors", "shard_00002.safetensors"]
    rows = store.read(20, 50)  # shard 1 rows 20..32, then shard 2 rows 0..16
    want = torch.cat([shards[1]["activations"][20:], shards[2]["activations"][:17]])
    assert (rows.shard, rows.start) == (1, 20) and torch.equal(rows.activations, want)
    assert torch.equal(rows.positions, torch.cat([shards[1]["positions"][20:], shards[2]["positions"][:17]]))
    assert [p.shard for p in store.iter_rows(rows_per_read=64)] == [1, 2, 2]
    assert sum(len(p.token_ids) for p in store.iter_rows(rows_per_read=8, stop=40)) == 40
    # shard 1: positions 1..31 at rows 0..30, 1..2 at rows 31..32; shard 2 (global rows 33..) restarts at 1
    assert store.window_of(5) == (0, 31) and store.window_of(32) == (31, 33)
    assert store.window_of(33) == (33, 64)
    with pytest.raises(ValueError, match="has 3 shards; pick 0..2"):
        ActivationStore(tmp_path, first_shard=3)
    with pytest.raises(ValueError, match="from --first_shard 1 but the store has 3 shards; pass 1..2"):
        ActivationStore(tmp_path, num_shards=3, first_shard=1)
