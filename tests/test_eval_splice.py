"""Model-level metrics: CE loss recovered and KL equal a hand-spliced forward through a tiny random Llama.

The reference runs the Llama's layers one by one (embeddings, rotary, an explicit causal mask, the
decoder layers, the final norm, the head), replaces the residual stream after layer L by hand, and
computes CE and KL with plain formulas: no hook, no code of saetron.eval.
"""

import pytest
import torch
from collect_fixtures import _seed_and_offline, docs_jsonl, tiny_llama  # noqa: F401
from eval_support import identity_sae, random_sae, zero_sae

from saetron.collect.collector import collect
from saetron.collect.config import CollectConfig
from saetron.collect.data import open_text_stream
from saetron.collect.packing import iter_windows, make_batch, special_token_ids
from saetron.eval.config import EvalConfig
from saetron.eval.run import run

LAYER, CONTEXT, WINDOWS, D_MODEL = 1, 32, 4, 64  # tiny_llama: 4 layers, d_model 64


@pytest.fixture(scope="module")
def stores(tiny_llama, docs_jsonl, tmp_path_factory):  # noqa: F811
    """Stores of the tiny Llama's layer 1: the default special-token policy, and every token kept."""
    out = {}
    for keep in (False, True):
        folder = str(tmp_path_factory.mktemp(f"store_keep{keep}"))
        collect(CollectConfig(model=tiny_llama, target_layer=LAYER, output_dir=folder, dataset=docs_jsonl,
                              context_size=CONTEXT, batch_size=4, max_tokens=300, keep_special_tokens=keep))
        out[keep] = folder
    return out


def hand_logits(model, input_ids, replace=None):
    """The Llama run layer by layer; `replace(h)` [B, T, d] after layer LAYER when given."""
    base = model.model
    h = base.embed_tokens(input_ids)
    T = input_ids.shape[1]
    position_ids = torch.arange(T).unsqueeze(0)
    rotary = base.rotary_emb(h, position_ids)
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
    for i, layer in enumerate(base.layers):
        h = layer(h, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids)
        h = h[0] if isinstance(h, tuple) else h
        if i == LAYER and replace is not None:
            h = replace(h)
    return model.lm_head(base.norm(h))


def hand_metrics(folder, docs, sae, keep_special: bool) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    windows = [w for w, _ in iter_windows(open_text_stream(docs), tokenizer, CONTEXT, None, None)][:WINDOWS]
    batch = make_batch(windows, torch.tensor(special_token_ids(tokenizer)), keep_special, {}, False)
    ids = batch.input_ids
    keep = torch.zeros(ids.numel(), dtype=torch.bool)
    keep[batch.keep_idx] = True
    keep = keep.view(ids.shape)  # [B, T]

    def spliced(h):
        x_hat = sae(h.reshape(-1, D_MODEL))[0].view(h.shape)
        return torch.where(keep.unsqueeze(-1), x_hat, h)

    with torch.no_grad():
        # the reference reproduces the model's own forward
        assert torch.allclose(hand_logits(model, ids), model(input_ids=ids).logits, atol=1e-5)
        logp = {name: torch.log_softmax(hand_logits(model, ids, fn), -1).double() for name, fn in
                (("clean", None), ("spliced", spliced), ("zero", torch.zeros_like))}
    out = {}
    for name, lp in logp.items():
        nll = -lp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, T-1]: predicting token t+1
        out[f"ce_loss_{name}"] = float(nll[keep[:, :-1]].mean())
        if name != "clean":
            kl = (logp["clean"].exp() * (logp["clean"] - lp)).sum(-1)  # [B, T]
            out[f"kl_{name}"] = float(kl[keep].mean())
    out["ce_loss_recovered"] = (out["ce_loss_zero"] - out["ce_loss_spliced"]) / (
        out["ce_loss_zero"] - out["ce_loss_clean"])
    out["kl_recovered"] = (out["kl_zero"] - out["kl_spliced"]) / out["kl_zero"]
    return out


def evaluate_with_model(tmp_path, sae, store: str, model: str, docs: str) -> dict:
    sae.save(tmp_path / "sae")
    cfg = EvalConfig(sae=str(tmp_path / "sae"), data_dir=store, output_dir=str(tmp_path / "out"), model=model,
                     dataset=docs, context_size=CONTEXT, ce_windows=WINDOWS, model_batch_size=3)
    return run(cfg)


@pytest.mark.parametrize("keep_special", [False, True])
def test_ce_recovered_equals_a_hand_spliced_forward(tmp_path, stores, tiny_llama, docs_jsonl, keep_special):  # noqa: F811
    sae = random_sae(D_MODEL, 128, 8, seed=3)
    got = evaluate_with_model(tmp_path, sae, stores[keep_special], tiny_llama, docs_jsonl)
    want = hand_metrics(tiny_llama, docs_jsonl, sae, keep_special)
    assert got["windows"] == WINDOWS and got["ce_text"]["why"] == "--dataset from its beginning"
    # float32 logits of the same model and inputs, batched 3 + 1 windows here and 4 in the reference:
    # the means agree to ~1e-6 relative; 1e-5 allows a different GEMM blocking per batch shape.
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert 0 < got["kl_spliced"] < got["kl_zero"]  # a random SAE hurts, zero ablation more


def test_identity_sae_recovers_all_and_zero_sae_nothing(tmp_path, stores, tiny_llama, docs_jsonl):  # noqa: F811
    ident = evaluate_with_model(tmp_path / "identity", identity_sae(D_MODEL), stores[False], tiny_llama,
                                docs_jsonl)
    assert ident["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert ident["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)  # the spliced model is the clean one
    assert ident["kl_spliced"] == pytest.approx(0.0, abs=1e-7) and ident["kl_recovered"] == pytest.approx(1.0)
    # Every position spliced (a store that keeps special tokens): a zero SAE is the zero ablation.
    zero = evaluate_with_model(tmp_path / "zero", zero_sae(D_MODEL), stores[True], tiny_llama, docs_jsonl)
    assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert zero["ce_loss_spliced"] == pytest.approx(zero["ce_loss_zero"], rel=1e-6)
    assert zero["dead_fraction"] == 1.0 and zero["l0"] == 0.0
