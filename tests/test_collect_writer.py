"""The asynchronous shard writer: batch slots recycled through the free list, shards equal to what was
appended, writer errors raised in the caller; on CUDA, pinned buffers filled on a side stream."""

import os
import shutil

import pytest
import torch
from collect_fixtures import _seed_and_offline, docs_jsonl, tiny_llama  # noqa: F401
from safetensors.torch import load_file

from saetron.collect.collector import collect
from saetron.collect.config import CollectConfig
from saetron.collect.store import new_manifest
from saetron.collect.writer import ShardWriter

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]
D_MODEL = 48


def manifest(dtype: torch.dtype) -> dict:
    return new_manifest(model="m", revision="r", target_layer=0, hook_point="resid_post", d_model=D_MODEL,
                        dtype=dtype, context_size=8, keep_special_tokens=False, dataset="d", split="train",
                        text_field="text", tokenizer="t")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shards_hold_what_was_appended(device, dtype, tmp_path):
    # Two slots for eighteen batches: each slot goes round the free list nine times.
    writer = ShardWriter([(str(tmp_path), manifest(dtype))], batch_rows=16, shard_rows=40, d_model=D_MODEL,
                         dtype=dtype, device=torch.device(device), num_buffers=2)
    sent = []
    for shard in range(6):
        for batch in range(3):
            n = 5 + batch + shard
            rows = torch.randn(n, D_MODEL, device=device).to(dtype)  # [n, d_model]
            ids = torch.randint(0, 100, (n,), dtype=torch.int32)
            positions = torch.arange(1, n + 1, dtype=torch.int32)
            writer.append(rows, ids, positions)
            sent.append((rows.cpu(), ids, positions))
        writer.close_shard({"shard": shard})
    writer.finish({"end": True})
    assert writer.stores[0][1]["stream_state"] == {"shard": 5}
    assert writer.stores[0][1]["total_tokens"] == sum(len(ids) for _, ids, _ in sent)
    got = [load_file(os.path.join(tmp_path, s["file"])) for s in writer.stores[0][1]["shards"]]
    for key, column in (("activations", 0), ("token_ids", 1), ("positions", 2)):
        assert torch.equal(torch.cat([g[key] for g in got]), torch.cat([s[column] for s in sent])), key
    assert got[0]["activations"].dtype == dtype


def test_buffers_are_pinned_only_on_cuda(tmp_path):
    writer = ShardWriter([(str(tmp_path), manifest(torch.float32))], batch_rows=4, shard_rows=8,
                         d_model=D_MODEL, dtype=torch.float32, device=torch.device("cpu"), num_buffers=2)
    assert not writer._free.get().host[0].rows.is_pinned()
    writer.abort()


def test_writer_error_reaches_the_caller(tmp_path):
    out = tmp_path / "gone"
    out.mkdir()
    writer = ShardWriter([(str(out), manifest(torch.float32))], batch_rows=4, shard_rows=8, d_model=D_MODEL,
                         dtype=torch.float32, device=torch.device("cpu"), num_buffers=2)
    shutil.rmtree(out)  # the disk "fails" under the writer thread
    ids = torch.zeros(4, dtype=torch.int32)
    writer.append(torch.randn(4, D_MODEL), ids, ids + 1)
    with pytest.raises(OSError, match=r"cannot write shard .*gone/shard_00000.safetensors: .*No such file"):
        writer.finish({})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_collection_matches_cpu(tiny_llama, docs_jsonl, tmp_path):  # noqa: F811
    stores = {}
    for device in ("cpu", "cuda"):
        config = CollectConfig(model=tiny_llama, target_layer=1, output_dir=str(tmp_path / device),
                               dataset=docs_jsonl, context_size=32, batch_size=3, max_tokens=400,
                               shard_tokens=100, dtype="float32", device=device)
        manifest = collect(config)
        stores[device] = [load_file(os.path.join(config.output_dir, s["file"])) for s in manifest["shards"]]
    assert len(stores["cpu"]) == len(stores["cuda"])
    for cpu, cuda in zip(stores["cpu"], stores["cuda"]):
        assert torch.equal(cpu["token_ids"], cuda["token_ids"])
        # fp32 on both, different kernels (cuBLAS vs CPU BLAS): 1e-4 on unit-scale activations.
        torch.testing.assert_close(cuda["activations"], cpu["activations"], rtol=1e-4, atol=1e-4)


def test_nonfinite_rows_are_left_out_and_counted(tmp_path, caplog):
    writer = ShardWriter([(str(tmp_path), manifest(torch.float32))], batch_rows=16, shard_rows=16,
                         d_model=D_MODEL, dtype=torch.float32, device=torch.device("cpu"),
                         describe_token=lambda t: f"tok{t}")
    rows = torch.randn(10, D_MODEL)
    rows[3, 5], rows[7, 0] = float("nan"), float("inf")
    ids, positions = torch.arange(100, 110, dtype=torch.int32), torch.arange(1, 11, dtype=torch.int32)
    writer.append(rows, ids, positions)
    writer.finish({"end": True})
    keep = torch.tensor([i not in (3, 7) for i in range(10)])
    shard = load_file(os.path.join(tmp_path, "shard_00000.safetensors"))
    assert torch.equal(shard["activations"], rows[keep]) and torch.equal(shard["token_ids"], ids[keep])
    entry = writer.stores[0][1]["shards"][0]
    assert (entry["tokens"], entry["nonfinite_rows"], writer.nonfinite_rows) == (8, 2, 2)
    assert "left out 2 row(s) of 10 whose activations hold a NaN or Inf: 'tok103' at position 4, 'tok107' " \
           "at position 8" in caplog.text

    writer = ShardWriter([(str(tmp_path / "all"), manifest(torch.float32))], batch_rows=16, shard_rows=16,
                         d_model=D_MODEL, dtype=torch.float32, device=torch.device("cpu"))
    (tmp_path / "all").mkdir()
    writer.append(torch.full((4, D_MODEL), float("nan")), ids[:4], positions[:4])
    with pytest.raises(RuntimeError, match=r"every one of the 4 rows of shard_00000.safetensors has a NaN"):
        writer.finish({})
