"""The activation store a collection writes: manifest keys, token ids that decode to the text, positions,
excluded special tokens, and every local file format through the same streaming path."""

import json
import os

import pytest
import torch
import zstandard
from collect_fixtures import DOCS, _seed_and_offline, docs_jsonl, tiny_llama, write_jsonl  # noqa: F401
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer

from saetron.collect.collector import collect
from saetron.collect.config import CollectConfig
from saetron.collect.store import norm_stats, row_norms

CONTEXT = 32
MANIFEST_KEYS = ["format", "format_version", "model", "revision", "target_layer", "hook_point",
                 "hook_convention", "d_model", "dtype", "context_size", "special_token_policy", "dataset",
                 "split", "text_field", "stream_state", "stream_ended", "tokenizer", "shards", "total_tokens"]
SHARD_KEYS = ["file", "tokens", "stream_state", "nonfinite_rows", "norms", "quantization"]


def run(model: str, dataset: str, out: str, **overrides) -> dict:
    settings = dict(model=model, target_layer=1, output_dir=out, dataset=dataset, context_size=CONTEXT,
                    batch_size=3, max_tokens=10_000, shard_tokens=100)
    return collect(CollectConfig(**{**settings, **overrides}))


def read_store(out: str) -> dict[str, torch.Tensor]:
    """All shards of `out`, concatenated in manifest order."""
    with open(os.path.join(out, "manifest.json")) as f:
        shards = [load_file(os.path.join(out, s["file"])) for s in json.load(f)["shards"]]
    return {key: torch.cat([s[key] for s in shards]) for key in shards[0]}


def test_store_decodes_to_the_text(tiny_llama, docs_jsonl, tmp_path):  # noqa: F811
    out = str(tmp_path / "store")
    manifest = run(tiny_llama, docs_jsonl, out)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    store = read_store(out)
    n = manifest["total_tokens"]
    assert store["activations"].shape == (n, 64) and store["activations"].dtype == torch.float32
    assert store["token_ids"].dtype == store["positions"].dtype == torch.int32
    # The whole corpus is kept except BOS, the EOS between documents and the tail shorter than a window.
    text = tokenizer.decode(store["token_ids"].tolist())
    assert "".join(DOCS).startswith(text) and len(text) > 0.8 * len("".join(DOCS))
    # Every window contributes positions 1..T-1, less its EOS separators; none at position 0.
    positions = store["positions"].tolist()
    assert min(positions) == 1 and max(positions) == CONTEXT - 1
    windows = sum(1 for a, b in zip(positions, positions[1:]) if b <= a) + 1
    eos_rows = (CONTEXT - 1) * windows - n
    assert 0 < eos_rows <= len(DOCS)  # EOS rows excluded: at most one per document
    assert all(b > a for a, b in zip(positions, positions[1:]) if b > 1)  # increasing within a window
    assert not set(store["token_ids"].tolist()) & set(tokenizer.all_special_ids)


def test_manifest_and_shards(tiny_llama, docs_jsonl, tmp_path):  # noqa: F811
    out = str(tmp_path / "store")
    manifest = run(tiny_llama, docs_jsonl, out)
    with open(os.path.join(out, "manifest.json")) as f:
        on_disk = json.load(f)
    assert on_disk == manifest and list(on_disk) == MANIFEST_KEYS
    assert on_disk["format"] == "saetron-activations" and on_disk["format_version"] == 3
    assert (on_disk["d_model"], on_disk["dtype"], on_disk["text_field"]) == (64, "float32", "text")
    assert on_disk["special_token_policy"]["keep_special_tokens"] is False
    assert len(on_disk["shards"]) > 1
    assert sum(s["tokens"] for s in on_disk["shards"]) == on_disk["total_tokens"]
    # A shard closes at the first batch end with >= shard_tokens (100) rows; batches hold <= 3 * 31.
    assert all(100 <= s["tokens"] < 100 + 3 * CONTEXT for s in on_disk["shards"][:-1])
    assert sorted(os.listdir(out)) == [".lock", "manifest.json"] + [s["file"] for s in on_disk["shards"]]
    with safe_open(os.path.join(out, on_disk["shards"][0]["file"]), framework="pt") as f:
        assert f.metadata()["format"] == "saetron-activations" and f.metadata()["hook_point"] == "resid_post"
        assert f.metadata()["target_layer"] == "1"
    # Each entry: its stream state (the last one's is the manifest's), no dropped row, the statistics
    # of its rows' L2 norms, recomputed here from the shard itself.
    assert all(list(s) == SHARD_KEYS and s["nonfinite_rows"] == 0 for s in on_disk["shards"])
    assert all(s["quantization"] is None for s in on_disk["shards"])  # float32 rows, stored as they are
    assert on_disk["shards"][-1]["stream_state"] == on_disk["stream_state"]
    assert on_disk["stream_ended"] is True  # 10,000 tokens asked, the corpus has fewer
    for entry in on_disk["shards"]:
        norms = row_norms(load_file(os.path.join(out, entry["file"]))["activations"])
        assert entry["norms"] == norm_stats(norms)
        stats = entry["norms"]
        assert stats["min"] <= stats["median"] <= stats["q90"] <= stats["q99"] <= stats["max"]
        assert entry["norms"]["median"] == float(norms.double().median())  # lower median, as torch's


def test_keep_special_tokens(tiny_llama, docs_jsonl, tmp_path):  # noqa: F811
    out = str(tmp_path / "store")
    manifest = run(tiny_llama, docs_jsonl, out, keep_special_tokens=True, shard_tokens=10_000)
    store = read_store(out)
    assert manifest["total_tokens"] % CONTEXT == 0  # whole windows
    assert store["positions"].view(-1, CONTEXT).eq(torch.arange(CONTEXT, dtype=torch.int32)).all()
    assert store["token_ids"].view(-1, CONTEXT)[:, 0].eq(0).all()  # BOS (id 0) at every window start
    assert manifest["special_token_policy"] == {"keep_special_tokens": True, "excluded": "none"}


def _write_formats(folder) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"jsonl": write_jsonl(str(folder / "d.jsonl"), DOCS)}
    with open(paths["jsonl"], "rb") as f:
        raw = f.read()
    paths["jsonl.zst"] = str(folder / "d.jsonl.zst")
    with open(paths["jsonl.zst"], "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(raw))
    paths["parquet"] = str(folder / "d.parquet")
    pq.write_table(pa.table({"text": DOCS}), paths["parquet"])
    paths["content"] = write_jsonl(str(folder / "content.jsonl"), DOCS, field="content")
    return paths


def test_local_formats_give_the_same_store(tiny_llama, tmp_path):  # noqa: F811
    paths = _write_formats(tmp_path)
    stores = {}
    for name, path in paths.items():
        manifest = run(tiny_llama, path, str(tmp_path / name.replace(".", "_")), max_tokens=200)
        assert manifest["text_field"] == ("content" if name == "content" else "text")
        stores[name] = read_store(str(tmp_path / name.replace(".", "_")))
    for name, store in stores.items():
        assert torch.equal(store["token_ids"], stores["jsonl"]["token_ids"]), name
        assert torch.equal(store["activations"], stores["jsonl"]["activations"]), name


def test_txt_lines_are_documents(tiny_llama, tmp_path):  # noqa: F811
    path = tmp_path / "d.txt"
    path.write_text("\n".join(d.replace("\n", " ") for d in DOCS))
    run(tiny_llama, str(path), str(tmp_path / "store"), max_tokens=100)
    text = AutoTokenizer.from_pretrained(tiny_llama).decode(read_store(str(tmp_path / "store"))["token_ids"])
    assert text.startswith(DOCS[0][:40])


def test_dataset_without_text_field(tiny_llama, tmp_path):  # noqa: F811
    path = write_jsonl(str(tmp_path / "body.jsonl"), DOCS, field="body")
    with pytest.raises(ValueError, match=r"no text field 'text' or 'content'.*\['body', 'id'\].*text_field"):
        run(tiny_llama, path, str(tmp_path / "store"))
    with pytest.raises(ValueError, match=r"no text field 'title'.*--text_field"):
        run(tiny_llama, path, str(tmp_path / "store"), text_field="title")
    assert os.listdir(tmp_path / "store") == [".lock"]  # no shard, no manifest
    manifest = run(tiny_llama, path, str(tmp_path / "store"), text_field="body", max_tokens=50)
    assert manifest["text_field"] == "body"
