"""Collector hooks: the captured activation is the model's own hidden state (tiny Llama and DeepSeek-V3)."""

import os

import pytest
import torch
from collect_fixtures import _seed_and_offline, docs_jsonl, tiny_deepseek, tiny_llama  # noqa: F401
from safetensors.torch import load_file
from torch import nn

from saetron.collect.collector import collect
from saetron.collect.config import CollectConfig
from saetron.collect.data import open_text_stream
from saetron.collect.model import LayerHook, load_model
from saetron.collect.packing import iter_windows, make_batch, special_token_ids

CONTEXT, WINDOWS = 32, 6


def expected_rows(folder: str, docs: str, layer: int, hook_point: str):
    """The rows the store must hold, from the full (untruncated) model's `output_hidden_states`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    windows = [w for w, _ in iter_windows(open_text_stream(docs), tokenizer, CONTEXT, None, None)][:WINDOWS]
    special = torch.tensor(special_token_ids(tokenizer))
    batch = make_batch(windows, special, keep_special=False, state={}, pin=False)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert layer + 1 < model.config.num_hidden_layers, "the last hidden state is normed: use an earlier layer"
    with torch.no_grad():
        hidden = model(batch.input_ids, output_hidden_states=True).hidden_states
    index = layer + 1 if hook_point == "resid_post" else layer  # hidden_states[0] is the embeddings
    return hidden[index].flatten(0, 1)[batch.keep_idx], batch


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_deepseek"])
@pytest.mark.parametrize("hook_point", ["resid_post", "resid_pre"])
def test_store_holds_output_hidden_states(arch, hook_point, request, docs_jsonl, tmp_path):  # noqa: F811
    folder, layer = request.getfixturevalue(arch), 1
    out = str(tmp_path / "store")
    config = CollectConfig(model=folder, target_layer=layer, output_dir=out, hook_point=hook_point,
                           dataset=docs_jsonl, context_size=CONTEXT, batch_size=WINDOWS,
                           max_tokens=WINDOWS * (CONTEXT - 1) - 10, shard_tokens=10_000)
    manifest = collect(config)
    shard = load_file(os.path.join(out, manifest["shards"][0]["file"]))
    want, batch = expected_rows(folder, docs_jsonl, layer, hook_point)
    assert manifest["total_tokens"] == len(batch.keep_idx) == shard["activations"].shape[0]
    assert torch.equal(shard["token_ids"], batch.token_ids)
    assert torch.equal(shard["positions"], batch.positions)
    # fp32 on CPU, the same batch through the same kernels; 1e-5 allows a different matmul blocking
    # between the truncated and the full model.
    torch.testing.assert_close(shard["activations"], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_deepseek"])
def test_hook_points_add_up(arch, request):
    """resid_post = resid_pre + attn_out + mlp_out: each hook point captures its own block."""
    loaded = load_model(request.getfixturevalue(arch), target_layer=2)
    assert len(loaded.layers) == 3  # layers after the target are never built
    input_ids = torch.randint(3, 300, (2, 16))
    got = {}
    for point in ("resid_pre", "attn_out", "mlp_out", "resid_post"):
        with LayerHook(loaded.layers, 2, point) as hook:
            got[point] = hook.run(loaded.model, input_ids).clone()  # [B, T, d_model]
    assert got["resid_post"].shape == (2, 16, loaded.d_model)
    torch.testing.assert_close(got["resid_pre"] + got["attn_out"] + got["mlp_out"], got["resid_post"],
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got["attn_out"], got["mlp_out"])


class _Layer(nn.Linear):
    """A layer returning a tensor, or a 1-tuple like older transformers decoder layers."""

    def __init__(self, as_tuple: bool):
        super().__init__(8, 8)
        self.as_tuple = as_tuple

    def forward(self, x):
        y = super().forward(x)
        return (y,) if self.as_tuple else y


class _Model(nn.Module):
    def __init__(self, as_tuple: bool):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList(_Layer(as_tuple) for _ in range(3))

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
            h = h[0] if isinstance(h, tuple) else h
        return h


@pytest.mark.parametrize("hook_point", ["resid_post", "resid_pre"])
def test_tuple_and_tensor_layers_both_work(hook_point):
    input_ids = torch.arange(10).view(2, 5)
    plain = _Model(as_tuple=False)
    h = plain.embed(input_ids)
    for layer in plain.layers[: 1 if hook_point == "resid_pre" else 2]:
        h = layer(h)
    for model in (plain, _Model(as_tuple=True)):
        with LayerHook(model.layers, 1, hook_point) as hook:
            torch.testing.assert_close(hook.run(model, input_ids), h)


def test_bad_layer_and_hook_point(tiny_llama):  # noqa: F811
    with pytest.raises(ValueError, match=r"--target_layer 4: .* has 4 layers; pick 0..3"):
        load_model(tiny_llama, target_layer=4)
    with pytest.raises(ValueError, match="hook_point='resid_mid'"):
        CollectConfig(model=tiny_llama, target_layer=0, output_dir="x", hook_point="resid_mid")


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_deepseek"])
def test_splice_replaces_the_hooked_activation(arch, request):
    """Splice mode runs the whole model with the hook point's output replaced: identity changes nothing;
    scaling resid_pre of layer L is scaling resid_post of layer L - 1; a change at mlp_out matters."""
    loaded = load_model(request.getfixturevalue(arch), target_layer=2, all_layers=True)
    assert len(loaded.layers) == 4  # every layer: the forward runs to the logits
    input_ids = torch.randint(3, 300, (2, 16))

    def logits(layer=None, point=None, fn=None):
        if fn is None:
            return loaded.model(input_ids=input_ids, use_cache=False).logits
        with LayerHook(loaded.layers, layer, point, splice=fn):
            return loaded.model(input_ids=input_ids, use_cache=False).logits

    with torch.inference_mode():
        clean = logits()
        for point in ("resid_pre", "attn_out", "mlp_out", "resid_post"):
            torch.testing.assert_close(logits(2, point, lambda h: h), clean, rtol=0, atol=0)
        half = lambda h: 0.5 * h
        torch.testing.assert_close(logits(2, "resid_pre", half), logits(1, "resid_post", half),
                                   rtol=1e-6, atol=1e-6)  # the same tensor scaled: only rounding differs
        assert not torch.allclose(logits(2, "mlp_out", half), clean, atol=1e-3)


def test_splice_keeps_tuple_outputs():
    """A layer returning a 1-tuple gets a 1-tuple back: zeroing layer 1's output leaves layer 2's bias."""
    input_ids = torch.arange(10).view(2, 5)
    for as_tuple in (False, True):
        model = _Model(as_tuple=as_tuple)
        with torch.no_grad(), LayerHook(model.layers, 1, "resid_post", splice=torch.zeros_like):
            torch.testing.assert_close(model(input_ids), model.layers[2].bias.expand(2, 5, 8))
