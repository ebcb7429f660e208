"""The trainer in one process on CPU: it learns, its flags parse, its outputs load (SAELens included)."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file
from train_support import read_metrics, synthetic_activations, train_in_process, write_store

from saetron.sae import SparseAutoencoder
from saetron.sae.metrics import METRIC_KEYS
from saetron.sae.train import parse_args

# 16 steps of 256 tokens over 3 uneven shards: a few seconds, enough for every trend below (a high lr:
# Adam moves each weight ~lr per step, and the ReLU biases must move ~0.1 for L0 to respond to l1).
FLAGS = ["--d_sae", "128", "--batch_size", "256", "--lr", "2e-2", "--log_every", "4", "--max_steps", "16",
         "--dead_window", "2048"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("store"), [1500, 1300, 1296])


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("relu")
    last = train_in_process(store, out, *FLAGS, "--l1_coeff", "1e-3", "--lr_warmup_steps", "2")
    return out, last


def test_loss_falls_and_explained_variance_rises(trained):
    out, last = trained
    lines = read_metrics(out)
    assert [m["step"] for m in lines] == [4, 8, 12, 16]
    assert all(list(m) == list(METRIC_KEYS) for m in lines)
    assert lines[-1]["loss"] < 0.6 * lines[0]["loss"]
    # The least-squares encoder init starts near 0.77 here (Kaiming: -3.6); training still lifts it.
    assert lines[-1]["explained_variance"] > max(lines[0]["explained_variance"] + 0.1, 0.85)
    assert last == pytest.approx(lines[-1])
    assert lines[-1]["lr"] == 2e-2 and lines[0]["tokens_per_s"] > 0
    assert 0 <= lines[-1]["dead_fraction"] <= 1


def test_outputs_are_written_and_reload(trained, store):
    out, last = trained
    resolved = json.loads((out / "train_config.json").read_text())
    assert (resolved["d_model"], resolved["target_layer"], resolved["dtype"]) == (32, 3, "float32")
    sae = SparseAutoencoder.load(out)
    assert (sae.d_in, sae.d_sae) == (32, 128)
    # The mean estimated before step 0 is the data's (all 4096 tokens fit in --stats_tokens).
    x = torch.cat([load_file(p)["activations"] for p in sorted(store.glob("shard_*.safetensors"))])
    torch.testing.assert_close(sae.activation_mean, x.mean(0), rtol=0, atol=1e-5)
    log_density = load_file(out / "saelens" / "sparsity.safetensors")["sparsity"]
    assert log_density.shape == (128,) and bool((log_density <= 0).all())
    assert (out / "checkpoints" / "step_00000016" / ".metadata").is_file()


@pytest.mark.skipif(importlib.util.find_spec("sae_lens") is None, reason="sae-lens is not installed")
def test_saelens_export_loads_and_matches(trained):
    from sae_lens import SAE

    out, _ = trained
    ours = SparseAutoencoder.load(out)
    theirs = SAE.load_from_disk(str(out / "saelens"))
    x = synthetic_activations(64, 32, 96, 4.0, seed=99)
    with torch.no_grad():
        recon, _, _ = ours(x)
        their_recon = theirs.decode(theirs.encode(x))
    # float32 both sides; folding the centering into b_enc/b_dec reorders a few additions (~1e-6).
    torch.testing.assert_close(their_recon, recon, rtol=1e-4, atol=1e-4)


def test_l0_falls_as_l1_coeff_rises(store, tmp_path):
    l0 = {}
    for l1 in ("1e-4", "1e-1"):
        l0[l1] = train_in_process(store, tmp_path / l1, *FLAGS, "--l1_coeff", l1)["l0"]
    assert l0["1e-1"] < 0.7 * l0["1e-4"]


def test_topk_trains_with_k_active(store, tmp_path):
    last = train_in_process(store, tmp_path, *FLAGS, "--activation", "topk", "--k", "8",
                            "--lr_decay", "linear")
    assert last["l0"] <= 8 and last["explained_variance"] > 0.3


def test_seed_flags_parse_and_run(store, tmp_path):
    seed_flags = ["--num_shards", "2", "--target_layer", "3", "--d_model", "32", "--d_sae", "64",
                  "--l1_coeff", "1e-3", "--lr", "1e-3", "--batch_size", "200", "--epochs", "2",
                  "--normalize_activations", "layer_norm", "--apply_b_dec_to_input"]
    last = train_in_process(store, tmp_path, *seed_flags, "--log_every", "100")
    assert last["step"] == 2 * (1500 + 1300) // 200
    cfg = parse_args(["--data_dir", "d", "--output_dir", "o", *seed_flags, "--activation", "topk", "--k", "4",
                      "--backend", "reference", "--dtype", "float32", "--lr_warmup_steps", "5",
                      "--l1_warmup_steps", "5", "--lr_decay", "cosine", "--seed", "3", "--log_every", "2",
                      "--checkpoint_every", "4", "--resume", "--max_steps", "9", "--wandb", "false"])
    assert (cfg.apply_b_dec_to_input, cfg.resume, cfg.wandb, cfg.k) == (True, "latest", False, 4)
    assert (cfg.num_shards, cfg.lr_decay, cfg.max_steps) == (2, "cosine", 9)
    with pytest.raises(SystemExit):
        parse_args(["--data_dir", "d", "--output_dir", "o", "--activation", "gelu"])


@pytest.mark.parametrize("flag, value, stored", [("--d_model", "48", "32"), ("--target_layer", "7", "3")])
def test_manifest_mismatch_is_an_error(store, tmp_path, flag, value, stored):
    with pytest.raises(ValueError, match=rf"{flag} {value} does not match the store's manifest .* {stored}"):
        train_in_process(store, tmp_path, *FLAGS, flag, value)
