"""Several hook sites in one pass: each site's store equals its one-site run byte for byte, the model is cut
after the deepest layer, a crash between two sites' manifests resumes as one run, repair works per site."""

import hashlib
import os
import subprocess
import sys

import pytest
import torch
from collect_fixtures import _seed_and_offline, docs_jsonl, tiny_deepseek, tiny_llama  # noqa: F401
from torch import nn

from saetron.collect import collector
from saetron.collect.collector import collect
from saetron.collect.config import CollectConfig
from saetron.collect.model import LayerHook
from saetron.collect.repair import repair_store
from saetron.collect.store import StoreError, read_manifest
from saetron.collect.writer import CRASH_ENV

COMMON = dict(context_size=24, batch_size=2, max_tokens=300, shard_tokens=60)  # 4 shards of ~75 rows


def files(folder: str) -> dict[str, str]:
    """sha256 of every file a store lists (manifest and shards)."""
    manifest = read_manifest(folder)
    names = ["manifest.json"] + [entry["file"] for entry in manifest["shards"]]
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest() for name in names}


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_deepseek"])
def test_each_site_equals_its_one_site_run(arch, docs_jsonl, tmp_path, monkeypatch, request):  # noqa: F811
    model = request.getfixturevalue(arch)
    loads = []
    load_model = collector.load_model
    monkeypatch.setattr(collector, "load_model", lambda *a, **k: loads.append(a[1]) or load_model(*a, **k))
    out = str(tmp_path / "sites")
    stores = collect(CollectConfig(model=model, dataset=docs_jsonl, target_layer="2,1",
                                   hook_point="resid_pre,mlp_out,resid_post", output_dir=out, **COMMON))
    assert loads == [2]  # one model, cut after the deepest hooked layer
    assert list(stores) == [f"layer_{layer}.{point}" for layer in (2, 1)
                            for point in ("resid_pre", "mlp_out", "resid_post")]
    assert sorted(os.listdir(out)) == [".lock"] + sorted(stores)
    for name, manifest in stores.items():
        layer, point = name.removeprefix("layer_").split(".")
        single = str(tmp_path / name)
        alone = collect(CollectConfig(model=model, dataset=docs_jsonl, target_layer=int(layer),
                                      hook_point=point, output_dir=single, **COMMON))
        assert len(alone["shards"]) == 4 and alone == manifest, name
        assert files(single) == files(os.path.join(out, name)), name
    assert not torch.equal(_rows(out, "layer_2.mlp_out"), _rows(out, "layer_2.resid_post"))  # distinct sites


def _rows(folder: str, site: str) -> torch.Tensor:
    from saetron.collect.store import ActivationStore

    return torch.cat([rows.activations for rows in ActivationStore(os.path.join(folder, site)).iter_rows()])


class _Unreachable(nn.Linear):
    def forward(self, h):
        raise AssertionError("layer 2 ran: the forward should have stopped before it")


class _Layers(nn.Module):
    """Three layers; the last one raises if it runs."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 4)
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4), _Unreachable(4, 4)])

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return h


def test_the_forward_stops_before_a_deepest_resid_pre():
    model = _Layers()
    input_ids = torch.arange(6).view(2, 3)
    with LayerHook(model.layers, [0, 2], "resid_pre") as hook:
        pre0, pre2 = hook.capture(model, input_ids)
    torch.testing.assert_close(pre2, model.layers[1](model.layers[0](model.embed(input_ids))))
    assert torch.equal(pre0, model.embed(input_ids))
    with pytest.raises(ValueError, match="splice replaces one hook site, got 2"):
        LayerHook(model.layers, [0, 1], "resid_post", splice=lambda h: h)


def test_a_crash_between_sites_resumes_as_one_run(tiny_llama, docs_jsonl, tmp_path):  # noqa: F811
    settings = dict(model=tiny_llama, dataset=docs_jsonl, target_layer="1,2", **COMMON)
    whole = str(tmp_path / "whole")
    collect(CollectConfig(output_dir=whole, **settings))
    out = str(tmp_path / "resumed")
    command = [sys.executable, "-m", "saetron.collect"] + [f"--{k}={v}" for k, v in settings.items()] + \
        [f"--output_dir={out}"]
    # SIGKILL right after site 0 (layer 1) lists its 2nd shard: layer 2 still lists 1.
    killed = subprocess.run(command, env={**os.environ, CRASH_ENV: "2.0"}, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    counts = [len(read_manifest(os.path.join(out, site))["shards"]) for site in ("layer_1.resid_post",
                                                                                 "layer_2.resid_post")]
    assert counts == [2, 1]  # each store is consistent on its own, one shard apart
    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "holds 2 shards, the other sites 1" in resumed.stderr
    for site in ("layer_1.resid_post", "layer_2.resid_post"):
        assert files(os.path.join(out, site)) == files(os.path.join(whole, site)), site
        assert f"activation store: {os.path.join(out, site)} (4 shards" in resumed.stdout


def test_repair_works_per_site(tiny_llama, docs_jsonl, tmp_path):  # noqa: F811
    config = CollectConfig(model=tiny_llama, dataset=docs_jsonl, target_layer=1,
                           hook_point="resid_post,mlp_out", output_dir=str(tmp_path / "s"), **COMMON)
    whole = collect(CollectConfig(**{**config.to_dict(), "output_dir": str(tmp_path / "whole")}))
    collect(config)
    damaged = tmp_path / "s" / "layer_1.mlp_out" / "shard_00002.safetensors"
    with open(damaged, "r+b") as f:
        f.truncate(damaged.stat().st_size - 10)
    with pytest.raises(StoreError, match=rf"shard {damaged} is truncated.*--repair {tmp_path / 's'}"):
        collect(config)
    repaired = repair_store(tmp_path / "s")
    assert [len(repaired[name]["shards"]) for name in ("layer_1.resid_post", "layer_1.mlp_out")] == [4, 2]
    collect(config)  # drops the 2 shards resid_post holds beyond mlp_out, then recollects both
    for name in whole:
        assert files(str(tmp_path / "s" / name)) == files(str(tmp_path / "whole" / name)), name


def test_layouts_are_not_mixed(tiny_llama, docs_jsonl, tmp_path):  # noqa: F811
    one = dict(model=tiny_llama, dataset=docs_jsonl, **{**COMMON, "max_tokens": 60})
    collect(CollectConfig(target_layer=1, output_dir=str(tmp_path / "a"), **one))
    with pytest.raises(StoreError, match="holds one store .* writes a store per site into subfolders"):
        collect(CollectConfig(target_layer="1,2", output_dir=str(tmp_path / "a"), **one))
    collect(CollectConfig(target_layer="1,2", output_dir=str(tmp_path / "b"), **one))
    with pytest.raises(StoreError, match=r"holds the stores of a run of several sites \(layer_1.resid_post, "
                                         r"layer_2.resid_post\)"):
        collect(CollectConfig(target_layer=1, output_dir=str(tmp_path / "b"), **one))
    with pytest.raises(StoreError, match=r"holds the stores \['layer_1.resid_post'\] but not "
                                         r"\['layer_1.mlp_out'\]"):
        collect(CollectConfig(target_layer=1, hook_point="resid_post,mlp_out", output_dir=str(tmp_path / "b"),
                              **one))
    with pytest.raises(ValueError, match=r"target_layer=1,1: a value is repeated"):
        CollectConfig(target_layer="1,1", output_dir="x", **one)
    with pytest.raises(ValueError, match=r"hook_point='resid_mid'"):
        CollectConfig(target_layer=1, hook_point="resid_post,resid_mid", output_dir="x", **one)
    assert read_manifest(tmp_path / "b" / "layer_2.resid_post")["target_layer"] == 2
