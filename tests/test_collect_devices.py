"""A model spread over devices by a device_map (DeepSeek-V3 over all of a node's GPUs): tested on CPU with a
tiny DeepSeek-V3 whose later layers are offloaded to disk. accelerate then dispatches the model with the
same hooks that move activations between GPUs (AlignDevicesHook: weights brought to the execution device at
each forward), so the collector's capture, truncation and input placement run as they do across GPUs."""

import json

import pytest
import torch
from collect_fixtures import _seed_and_offline, docs_jsonl, tiny_deepseek  # noqa: F401
from safetensors.torch import load_file

from saetron.collect.collector import collect
from saetron.collect.config import CollectConfig
from saetron.collect.model import input_device, load_model, parse_device_map

# Layers 1.. on "disk" (as a second device would hold them); layer 3 lies past the deepest hooked layer (2).
SPREAD = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
          "model.layers.1": "disk", "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu",
          "lm_head": "cpu"}


def test_a_spread_model_collects_the_same_stores(tiny_deepseek, docs_jsonl, tmp_path):  # noqa: F811
    settings = dict(model=tiny_deepseek, dataset=docs_jsonl, target_layer="1,2",
                    hook_point="mlp_out,resid_post", context_size=24, batch_size=2, max_tokens=200,
                    shard_tokens=60)
    (tmp_path / "map.json").write_text(json.dumps(SPREAD))
    spread = collect(CollectConfig(output_dir=str(tmp_path / "spread"), device_map=str(tmp_path / "map.json"),
                                   **settings))
    plain = collect(CollectConfig(output_dir=str(tmp_path / "plain"), **settings))
    assert spread == plain
    for name, manifest in plain.items():
        for entry in manifest["shards"]:
            ours = load_file(tmp_path / "spread" / name / entry["file"])
            theirs = load_file(tmp_path / "plain" / name / entry["file"])
            assert all(torch.equal(ours[k], theirs[k]) for k in theirs), (name, entry["file"])


def test_device_map_truncation_and_input_device(tiny_deepseek):  # noqa: F811
    assert "model.layers.3" not in parse_device_map(SPREAD, last_layer=2)
    assert parse_device_map(SPREAD, last_layer=None) == SPREAD  # evaluation: the whole model
    assert parse_device_map("balanced", 2) == "balanced" and parse_device_map(None, 2) is None
    with pytest.raises(ValueError, match=r"--device_map: .*; expected a JSON object \{module name: device\}"):
        parse_device_map("{oops", 2)
    with pytest.raises(ValueError, match="not one of .*auto.*not a JSON object, and not a readable JSON"):
        parse_device_map("/no/such/map.json", 2)
    loaded = load_model(tiny_deepseek, target_layer=2, device_map={**SPREAD, "model.embed_tokens": "disk"})
    assert len(loaded.layers) == 3 and set(loaded.model.hf_device_map.values()) == {"cpu", "disk"}
    assert loaded.model.get_input_embeddings().weight.device.type == "meta"  # offloaded: moved in per forward
    assert input_device(loaded.model) == loaded.device == torch.device("cpu")
