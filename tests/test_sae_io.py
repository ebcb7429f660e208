"""Save/load identity, every load error, and the SAELens export against SAELens itself."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saetron.sae import SparseAutoencoder
from saetron.sae.io import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE


def _trained_like(normalize="expected_average_only_in", apply_b_dec=False, activation="relu", k=None):
    """An SAE in inference mode with trained-like biases, mean and architecture state."""
    sae = SparseAutoencoder(
        24, 80, normalize, apply_b_dec, activation=activation, k=k, l1_coeff=1e-3, backend="reference"
    )  # dense features: compared with SAELens' below
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.5)
        sae.activation_mean.normal_(2.0, 1.0)
        if activation == "batchtopk":
            sae.architecture.threshold.fill_(0.6)
            sae.architecture.threshold_batches.fill_(40)
        if activation == "jumprelu":
            sae.architecture.threshold_scale.fill_(0.5)
            sae.architecture.log_threshold.normal_(0, 0.5)
    return sae.eval()


ARCHITECTURES = [("relu", None), ("topk", 7), ("batchtopk", 7), ("jumprelu", 7)]


@pytest.mark.parametrize("activation, k", ARCHITECTURES)
def test_save_load_identity(tmp_path, activation, k):
    sae = _trained_like("layer_norm", True, activation, k)
    sae.save(tmp_path)
    assert (tmp_path / WEIGHTS_FILE).is_file() and (tmp_path / CONFIG_FILE).is_file()
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["format_version"] == FORMAT_VERSION
    loaded = SparseAutoencoder.load(tmp_path, backend="reference")
    assert loaded.cfg == sae.cfg and not loaded.training  # a loaded SAE is in inference mode
    assert set(loaded.state_dict()) == set(sae.state_dict())
    for name, value in sae.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    x = torch.randn(16, 24)
    for a, b in zip(sae(x), loaded(x)):
        if isinstance(a, dict):
            assert all(torch.equal(a[key], b[key]) for key in a)
        else:
            assert torch.equal(a, b)


FORMAT_V1 = Path(__file__).parent / "data" / "sae_format_v1"  # written by saetron at format_version 1


@pytest.mark.parametrize("name", ["relu_centered", "topk_layer_norm"])
def test_files_of_format_version_1_load_and_compute_as_before(name):
    """Folders saved by the first release of format_version 1 (d_in 8, d_sae 16), with the outputs that
    release computed on a fixed batch: they load, and the forward gives the same outputs."""
    sae = SparseAutoencoder.load(FORMAT_V1 / name, backend="reference")
    expected = load_file(FORMAT_V1 / name / "expected.safetensors")
    reconstructed, features, losses = sae(expected["x"])
    # fp32, the same math regrouped (one addmm for the encoder, the shift subtracted in one step):
    # round-off of sums of 8 terms of size ~5, so 1e-5
    close = lambda a, b: torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-5)
    close(reconstructed, expected["reconstructed"])
    close(features, expected["features"])
    for key, value in losses.items():
        close(value.reshape(1), expected[f"loss_{key}"])


def test_other_format_version_is_refused(tmp_path):
    _trained_like().save(tmp_path)
    raw = json.loads((tmp_path / CONFIG_FILE).read_text())
    raw["format_version"] = 0
    (tmp_path / CONFIG_FILE).write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=rf"{CONFIG_FILE}.*version 0.*version {FORMAT_VERSION}.*retrain"):
        SparseAutoencoder.load(tmp_path)


def test_shape_mismatch_is_refused(tmp_path):
    _trained_like().save(tmp_path)
    raw = json.loads((tmp_path / CONFIG_FILE).read_text())
    raw["config"]["d_sae"] = 96
    (tmp_path / CONFIG_FILE).write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"sae.safetensors.*W_enc has shape \(24, 80\).*\(24, 96\)"):
        SparseAutoencoder.load(tmp_path)


def test_missing_tensor_is_refused(tmp_path):
    _trained_like().save(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_FILE)
    del tensors["b_dec"]
    save_file(tensors, tmp_path / WEIGHTS_FILE)
    with pytest.raises(ValueError, match=r"sae.safetensors lacks tensor\(s\) \['b_dec'\]"):
        SparseAutoencoder.load(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_weights_are_refused(tmp_path, keep):
    _trained_like().save(tmp_path)
    path = tmp_path / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=r"sae.safetensors cannot be read.*truncated or corrupt"):
        SparseAutoencoder.load(tmp_path)


def test_truncated_or_missing_config_is_refused(tmp_path):
    _trained_like().save(tmp_path)
    path = tmp_path / CONFIG_FILE
    path.write_text(path.read_text()[:20])
    with pytest.raises(ValueError, match=r"sae_config.json is not valid JSON.*truncated"):
        SparseAutoencoder.load(tmp_path)
    path.unlink()
    with pytest.raises(ValueError, match=r"sae_config.json is missing"):
        SparseAutoencoder.load(tmp_path)


# -- SAELens export --------------------------------------------------------------------------------

needs_saelens = pytest.mark.skipif(
    importlib.util.find_spec("sae_lens") is None,
    reason="sae-lens is not installed (pip install -e '.[peers]'; CI installs it)",
)

EXPORT_CASES = [
    (normalize, apply_b_dec, activation, k)
    for normalize in ("expected_average_only_in", "layer_norm", "none")
    for apply_b_dec in (False, True)
    for activation, k in (("relu", None), ("topk", 6), ("batchtopk", 6), ("jumprelu", 6))
]


@needs_saelens
@pytest.mark.parametrize("normalize, apply_b_dec, activation, k", EXPORT_CASES)
def test_saelens_export_matches(tmp_path, normalize, apply_b_dec, activation, k):
    from sae_lens import SAE

    sae = _trained_like(normalize, apply_b_dec, activation, k)
    x = torch.randn(40, 24) * 2 + 2
    recon, features, _ = sae(x)
    sae.export_saelens(tmp_path, model_name="SmolLM2-135M", hook_name="model.layers.15")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu": "standard", "topk": "topk"}.get(activation, "jumprelu")
    assert cfg["d_in"] == 24 and cfg["d_sae"] == 80 and cfg["apply_b_dec_to_input"] is apply_b_dec
    assert cfg["normalize_activations"] == ("layer_norm" if normalize == "layer_norm" else "none")
    assert cfg["metadata"]["model_name"] == "SmolLM2-135M"
    assert cfg["metadata"]["sae_lens_version"].startswith("6.")

    theirs = SAE.load_from_disk(str(tmp_path))
    with torch.no_grad():
        their_features = theirs.encode(x)
        their_recon = theirs.decode(their_features)
    # 1e-5: the fold moves mu @ W_enc into b_enc (computed in fp64), leaving fp32 round-off of
    # sums over d_in = 24 terms of size ~5; measured max difference ~4e-6.
    torch.testing.assert_close(their_features, features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(their_recon, recon, atol=1e-5, rtol=1e-5)
    if activation in ("batchtopk", "jumprelu"):  # SAELens' JumpReLU with our thresholds
        expected = sae.architecture.thresholds() if activation == "jumprelu" else torch.full((80,), 0.6)
        torch.testing.assert_close(theirs.threshold.detach(), expected.detach(), rtol=0, atol=0)
        assert 0 < int((features > 0).sum()) < features.numel() // 2  # the thresholds cut some
