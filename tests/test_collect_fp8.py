"""float8_e4m3fn stores: the encoding's error bound (derived in collect/fp8.py), a collection stored as float8
decodes to the float32 collection within it with the error the manifest reports, and the trainer trains on
the decoded rows exactly as on a float32 store holding them."""

import numpy as np
import pytest
import torch
from collect_fixtures import _seed_and_offline, docs_jsonl, tiny_llama  # noqa: F401
from safetensors import safe_open
from train_support import read_metrics, train_in_process, write_store

from saetron.collect import fp8
from saetron.collect.collector import collect
from saetron.collect.config import CollectConfig
from saetron.collect.store import ActivationStore, new_manifest, read_shard_header, row_norms, write_shard

SCALED_UNIT = 2.0 ** -10  # half the spacing of e4m3fn's subnormals (2^-9), in units of the row's scale
RELATIVE = 2.0 ** -4  # half the spacing of 3 mantissa bits, relative
ROUNDING = 2.0 ** -20  # room for the float32 division and product (2^-24 relative each), kept loose


def bound(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """|x̂ - x| <= 2^-4 |x| + 2^-10 s per element (fp8.py), in float64."""
    x = x.double().abs()
    return (RELATIVE + ROUNDING) * x + SCALED_UNIT * scales.double()[:, None]


def test_encoding_error_bound():
    g = torch.Generator().manual_seed(0)
    # 12 decades of row scale; every 11th column of every 7th row 50x larger, so most elements of those rows
    # sit far below the row's max (small scaled values, the subnormal range); a zero row.
    x = torch.randn(512, 384, generator=g, dtype=torch.float64)
    x *= torch.logspace(-6, 6, 512, dtype=torch.float64)[:, None]
    x[::7, ::11] *= 50
    x[3] = 0
    x = x.float()
    codes, scales, errors = torch.empty(512, 384, dtype=fp8.FP8), torch.empty(512), torch.empty(512)
    fp8.encode(x, codes, scales, errors)
    decoded = fp8.decode(codes, scales)
    error = (decoded.double() - x.double()).abs()
    assert (error <= bound(x, scales)).all()
    # The bound is the format's, not slack: the worst relative error of round-to-nearest with 3 mantissa
    # bits is at 2^e (1 + 2^-4), half a spacing 2^(e-4) above 2^e: 2^-4 / (1 + 2^-4) = 1/17 (e5m2, with 2
    # bits, reaches 1/9 and fails the bound). Among normal-range elements the worst comes within 1% of it.
    normal = x.abs() >= 2.0 ** -6 * scales[:, None]
    relative = error[normal] / x.double().abs()[normal]
    assert 0.99 / 17 < relative.max() <= 1 / 17 + ROUNDING
    # Each row's largest element maps to 448 = 1.75 * 2^8: exact up to the float32 arithmetic.
    top = x.abs().argmax(dim=1, keepdim=True)
    assert (error.gather(1, top) <= 4 * 2.0 ** -24 * x.double().abs().gather(1, top)).all()
    # the per-row errors the collector records: float32 norms of the float32 differences, to 1e-6
    torch.testing.assert_close(errors.double(), (decoded.double() - x.double()).norm(dim=1), rtol=1e-6,
                               atol=0)
    assert torch.equal(decoded[3], torch.zeros(384)) and errors[3] == 0
    assert torch.equal(fp8.decode(codes.view(torch.uint8), scales), decoded)  # the bytes as stored
    bf16 = x.to(torch.bfloat16)  # what the collector encodes on a GPU: the same bound on the bf16 rows
    fp8.encode(bf16, codes, scales)
    assert ((fp8.decode(codes, scales).double() - bf16.double()).abs() <= bound(bf16, scales)).all()


def test_float8_store_decodes_to_the_float32_store(tiny_llama, docs_jsonl, tmp_path):  # noqa: F811
    settings = dict(model=tiny_llama, target_layer=2, dataset=docs_jsonl, context_size=24, batch_size=2,
                    max_tokens=300, shard_tokens=60)
    exact = collect(CollectConfig(output_dir=str(tmp_path / "f32"), dtype="float32", **settings))
    small = collect(CollectConfig(output_dir=str(tmp_path / "f8"), dtype="float8_e4m3fn", **settings))
    assert small["dtype"] == "float8_e4m3fn" and small["format_version"] == 3
    assert [s["tokens"] for s in small["shards"]] == [s["tokens"] for s in exact["shards"]]
    # The norms are of the rows before encoding: the same as the float32 store's.
    assert [s["norms"] for s in small["shards"]] == [s["norms"] for s in exact["shards"]]
    store, reference = ActivationStore(tmp_path / "f8"), ActivationStore(tmp_path / "f32")
    assert (store.stored_dtype, store.dtype, store.scaled) == (torch.float8_e4m3fn, torch.float32, True)
    for shard, entry, ref in zip(store.shards, small["shards"], reference.shards):
        rows, want = shard.rows(0, shard.tokens), ref.rows(0, ref.tokens)
        assert torch.equal(rows.token_ids, want.token_ids) and torch.equal(rows.positions, want.positions)
        scales = torch.from_numpy(np.array(shard.scales))
        difference = (rows.activations.double() - want.activations.double()).abs()
        assert (difference <= bound(want.activations, scales)).all()
        # The manifest's error is that of the stored rows, recomputed here in float64.
        error = (rows.activations.double() - want.activations.double()).norm(dim=1)
        norm = want.activations.double().norm(dim=1)
        q = entry["quantization"]
        assert q["relative_error"] == pytest.approx(float(error.norm() / norm.norm()), rel=1e-5)
        assert q["max_row_relative_error"] == pytest.approx(float((error / norm).max()), rel=1e-5)
        assert 0.005 < q["relative_error"] < RELATIVE  # e4m3 rounding: ~2-3% in practice
        with safe_open(str(shard.path), framework="pt") as f:
            assert f.get_slice("activations").get_dtype() == "F8_E4M3"
            assert f.get_slice("scales").get_shape() == [shard.tokens]
        # Bytes per row: d_model codes + a float32 scale + token id and position (int32), against 4 d_model
        # + 8 for float32 (and 2 d_model + 8 for bfloat16).
        offset, _ = read_shard_header(shard.path)
        assert shard.path.stat().st_size - offset == shard.tokens * (64 + 12)
        assert ref.path.stat().st_size - read_shard_header(ref.path)[0] == ref.tokens * (4 * 64 + 8)
    # gather decodes (into any float dtype) the rows iter_rows decodes
    rows = np.array([0, 7, 100, 5, store.total_tokens - 1])
    every = torch.cat([r.activations for r in store.iter_rows()])
    assert torch.equal(store.gather(rows, torch.empty(5, 64)), every[rows])
    torch.testing.assert_close(store.gather(rows, torch.empty(5, 64, dtype=torch.bfloat16)),
                               every[rows].to(torch.bfloat16), rtol=0, atol=0)


def test_trainer_trains_on_the_decoded_rows(tmp_path):
    """A float8 store and a float32 store holding its decoded rows give the same run, bit for bit."""
    small = write_store(tmp_path / "f8", [700, 524], d_model=24, dtype=torch.float8_e4m3fn)
    decoded = tmp_path / "f32"
    decoded.mkdir()
    source = ActivationStore(small)
    keys = ("model", "revision", "target_layer", "hook_point", "d_model", "context_size", "dataset", "split",
            "text_field", "tokenizer")
    manifest = new_manifest(**{k: source.manifest[k] for k in keys}, dtype=torch.float32,
                            keep_special_tokens=False)
    for rows in source.iter_rows():
        write_shard(decoded, manifest, rows.activations, rows.token_ids, rows.positions,
                    row_norms(rows.activations), {"shard": rows.shard})
    flags = ["--d_sae", "48", "--batch_size", "128", "--max_steps", "6", "--log_every", "2", "--lr", "1e-2"]
    train_in_process(small, tmp_path / "a", *flags)
    train_in_process(decoded, tmp_path / "b", *flags)
    drop = ("tokens_per_s",)
    assert [{k: v for k, v in m.items() if k not in drop} for m in read_metrics(tmp_path / "a")] == \
        [{k: v for k, v in m.items() if k not in drop} for m in read_metrics(tmp_path / "b")]
