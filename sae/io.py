"""Save, load and export a SparseAutoencoder: the native format and SAELens' on-disk format.

Native (one folder):
    sae_config.json      {"format": "saetron-sae", "format_version": 1, "config": SAEConfig fields}
    sae.safetensors      every entry of the model's state_dict: W_enc [d_in, d_sae], b_enc [d_sae],
                         W_dec [d_sae, d_in], b_dec [d_in], activation_mean [d_in], and an
                         architecture's own tensors as `architecture.<name>` (relu and topk have none,
                         so their files are those of format_version 1 as first written; batchtopk:
                         threshold, threshold_batches; jumprelu: log_threshold, threshold_scale).
                         Training state that is not the SAE's function (dead-latent counters) is not
                         saved. A loaded SAE is in inference mode (`.eval()`).

SAELens (`export_saelens`, the architecture's SAELens name: "standard" for relu, "topk", "jumprelu" for
jumprelu and for batchtopk, which SAELens saves as a JumpReLU with its global threshold everywhere):
    cfg.json (+ the architecture's extra fields), sae_weights.safetensors (W_enc, W_dec, b_enc, b_dec
    + the architecture's extra tensors). The normalization folds its centering into the biases
    (sae/normalization.py: SAELens has no mean buffer), so SAELens' encode/decode of raw activations
    equals ours. A layer_norm SAE exports with SAELens' "layer_norm" (our convention is SAELens').
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import SAEConfig

if TYPE_CHECKING:
    from .model import SparseAutoencoder

FORMAT = "saetron-sae"
FORMAT_VERSION = 1  # the seed's architecture v1.1; bump when the tensors or their meaning change
CONFIG_FILE = "sae_config.json"
WEIGHTS_FILE = "sae.safetensors"
SAELENS_CONFIG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_VERSION = "6.54.12"  # the SAELens release whose format (and loader) the export is tested against


def _atomic_write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)  # safetensors creates files 0600; the JSON beside it is 0644 (umask 022)
    os.replace(tmp, path)


def save_sae(sae: SparseAutoencoder, folder: str | Path) -> Path:
    """Write `sae.safetensors` then `sae_config.json` into folder (created); returns the folder.

    Each file is written to a temporary name and renamed, so a crash never leaves a half file
    under the final name.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = dict(sae.state_dict())
    _save_tensors(tensors, folder / WEIGHTS_FILE, {"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    _atomic_write_json(
        folder / CONFIG_FILE,
        {"format": FORMAT, "format_version": FORMAT_VERSION, "config": sae.cfg.to_dict()},
    )
    return folder


def _read_config(path: Path) -> SAEConfig:
    if not path.is_file():
        raise ValueError(f"{path} is missing: a saetron SAE folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file is truncated or corrupt") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds a JSON {type(raw).__name__}, not a saetron SAE config object")
    version = raw.get("format_version")
    if raw.get("format") != FORMAT or version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format {raw.get('format')!r} version {version!r}; "
            f"this saetron reads {FORMAT!r} version {FORMAT_VERSION}. Checkpoints of another architecture "
            "version do not load into this one: retrain the SAE with this version (or load it with the "
            "saetron release that wrote it)."
        )
    try:
        return SAEConfig(**raw["config"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: the config section is incomplete or has unknown fields ({err})") from err


def load_sae(
    folder: str | Path, device: torch.device | str = "cpu", backend: str = "auto"
) -> SparseAutoencoder:
    """Load a folder written by `save_sae` onto `device`, running on `backend` (not part of the saved
    config: it changes how, not what, the SAE computes); every problem is a ValueError naming the file."""
    from .model import SparseAutoencoder

    folder = Path(folder)
    cfg = _read_config(folder / CONFIG_FILE)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{weights} is missing; save the SAE again with sae.save(folder)")
    template = SparseAutoencoder.from_config(cfg, device="meta", backend=backend)  # shapes only
    expected = {name: tuple(t.shape) for name, t in template.state_dict().items()}  # + the architecture's
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            names = set(f.keys())
            missing = [n for n in expected if n not in names]
            if missing:
                raise ValueError(
                    f"{weights} lacks tensor(s) {missing}; expected {list(expected)}. "
                    "The file was not written by sae.save: save it again."
                )
            tensors = {n: f.get_tensor(n) for n in expected}
    except ValueError:
        raise
    except Exception as err:  # safetensors raises its own error types for a truncated header/body
        raise ValueError(
            f"{weights} cannot be read ({type(err).__name__}: {err}); the file is truncated or corrupt: "
            "restore it or save the SAE again"
        ) from err
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"{weights}: tensor {name} has shape {tuple(tensors[name].shape)}, but {CONFIG_FILE} "
                f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}) needs {shape}; the two files belong to different SAEs"
            )
    sae = SparseAutoencoder.from_config(cfg, device=device, dtype=tensors["W_enc"].dtype, backend=backend)
    sae.load_state_dict(tensors)
    return sae.eval()  # inference mode (e.g. BatchTopK's threshold); sae.train() to train it further


def saelens_state(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    """SAELens weights equivalent to `sae` on raw activations (the normalization's fold in the biases)."""
    with torch.no_grad():
        b_enc, b_dec = sae.normalization.saelens_fold(sae.W_enc, sae.b_enc, sae.b_dec, sae.activation_mean,
                                                      sae.cfg.apply_b_dec_to_input)
        state = {"W_enc": sae.W_enc.detach().clone(), "W_dec": sae.W_dec.detach().clone(),
                 "b_enc": b_enc, "b_dec": b_dec}
        state.update({name: t.detach().to(sae.W_enc.dtype).clone()
                      for name, t in sae.architecture.saelens_tensors().items()})
    return state


def export_saelens(sae: SparseAutoencoder, folder: str | Path, model_name: str, hook_name: str, *,
                   context_size: int | None = None, dataset_path: str | None = None,
                   prepend_bos: bool | None = None) -> Path:
    """Write SAELens' format into folder: cfg.json + sae_weights.safetensors. Returns the folder.

    context_size, dataset_path, prepend_bos: how the training activations were made (the trainer passes
    the store manifest's context_size and dataset, and prepend_bos=True: every window starts with BOS);
    written into cfg.json's metadata when given."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = sae.cfg
    saelens_cfg = {
        "architecture": sae.architecture.saelens_architecture(),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": sae.normalization.saelens_name,
        "reshape_activations": "none",
        "metadata": {
            "model_name": model_name,
            "hook_name": hook_name,
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": SAELENS_VERSION,
            "exported_by": "saetron",
        },
    }
    collected = {"context_size": context_size, "dataset_path": dataset_path, "prepend_bos": prepend_bos}
    saelens_cfg["metadata"].update({k: v for k, v in collected.items() if v is not None})
    saelens_cfg.update(sae.architecture.saelens_config())
    _save_tensors(saelens_state(sae), folder / SAELENS_WEIGHTS_FILE, {"format": "pt"})
    _atomic_write_json(folder / SAELENS_CONFIG_FILE, saelens_cfg)
    return folder
