"""Window packing: BOS at every window start, documents joined by EOS, and a resume from any window's stream
state continues with exactly the windows that followed it."""

import itertools

import pytest
from collect_fixtures import DOCS, _seed_and_offline, docs_jsonl, tiny_llama  # noqa: F401
from transformers import AutoTokenizer

from saetron.collect import packing
from saetron.collect.data import EMBEDDED, open_text_stream
from saetron.collect.packing import iter_windows

CONTEXT = 16


@pytest.mark.parametrize("source", ["jsonl", EMBEDDED])
def test_resume_from_any_window(source, tiny_llama, docs_jsonl, monkeypatch):  # noqa: F811
    # 3 documents per tokenizer call: windows cross call boundaries, and each resume stays cheap.
    monkeypatch.setattr(packing, "DOCS_PER_CALL", 3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    dataset = docs_jsonl if source == "jsonl" else EMBEDDED
    count = 40
    windows = iter_windows(open_text_stream(dataset), tokenizer, CONTEXT, None, None)
    whole = list(itertools.islice(windows, count))
    assert all(len(w) == CONTEXT and w[0] == tokenizer.bos_token_id for w, _ in whole)
    for k in range(0, count - 1, 3):  # every third window: a stream opens in ~0.15 s
        resumed = iter_windows(open_text_stream(dataset), tokenizer, CONTEXT, None, whole[k][1])
        window, state = next(resumed)
        assert window == whole[k + 1][0], f"resumed after window {k}"
        assert state == whole[k + 1][1]


def test_windows_are_the_documents_joined_by_eos(tiny_llama, docs_jsonl):  # noqa: F811
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    windows = [w for w, _ in iter_windows(open_text_stream(docs_jsonl), tokenizer, CONTEXT, None, None)]
    stream = [t for w in windows for t in w[1:]]  # drop each window's BOS
    want = [t for doc in DOCS for t in tokenizer(doc, add_special_tokens=False)["input_ids"] + [1]]
    assert len(want) - len(stream) < CONTEXT - 1  # only the tail shorter than a window is dropped
    assert stream == want[: len(stream)]


def test_text_shards_read_every_wth_document_and_resume(tiny_llama, docs_jsonl):  # noqa: F811
    """Rank r of W (live training under torchrun; text_shard) reads documents r, r + W, ...: the shards are
    disjoint, together the whole text, and each resumes from any of its windows."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    docs = [f"document {i}: " + DOCS[i % len(DOCS)] for i in range(12)]  # distinct documents
    eos = tokenizer.eos_token_id

    def tokens(shard):
        windows = iter_windows(_stream(docs), tokenizer, CONTEXT, None, None, text_shard=shard)
        return [(w, s) for w, s in windows]

    for rank in range(3):
        mine = tokens((rank, 3))
        stream = [t for w, _ in mine for t in w[1:]]
        encoded = tokenizer(docs[rank::3], add_special_tokens=False)["input_ids"]
        want = [t for ids in encoded for t in ids + [eos]]
        assert len(want) - len(stream) < CONTEXT - 1 and stream == want[: len(stream)], rank
        for k in range(0, len(mine) - 1, 2):
            resumed = iter_windows(_stream(docs), tokenizer, CONTEXT, None, mine[k][1], text_shard=(rank, 3))
            assert next(resumed) == mine[k + 1], (rank, k)


def _stream(docs):
    import datasets

    return datasets.IterableDataset.from_generator(_docs, gen_kwargs={"docs": docs})


def _docs(docs):
    for doc in docs:
        yield {"text": doc}
