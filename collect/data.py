"""Text streams: a hub dataset, local files or the embedded offline corpus, as resumable IterableDatasets."""

from __future__ import annotations

import glob
import logging
import os
import sysconfig

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"
TEXT_FIELDS = ("text", "content")  # the seed's order: `text`, falling back to `content`
# local file suffix -> datasets builder; jsonl.zst goes through `json` (decompressed by fsspec).
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".jsonl.zst": "json", ".parquet": "parquet",
                  ".txt": "text"}


def _embedded_docs(sources: list[str]):
    """One document per source: `topic:NAME` (pydoc_data.topics) or a standard-library file path."""
    from pydoc_data.topics import topics

    for source in sources:
        if source.startswith("topic:"):
            yield {"text": topics[source[len("topic:"):]]}
        else:
            with open(source, encoding="utf-8", errors="replace") as f:
                yield {"text": f.read()}


def embedded_corpus():
    """Python's documentation topics then its top-level standard-library sources: prose and code,
    like SlimPajama's mix, shipped with every Python (about 0.5 MB of prose and 5 MB of code)."""
    from pydoc_data.topics import topics

    import datasets

    stdlib = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    sources = [f"topic:{name}" for name in sorted(topics)] + stdlib
    # A list in gen_kwargs makes one shard per source: the stream state is (source, example) indices.
    return datasets.IterableDataset.from_generator(_embedded_docs, gen_kwargs={"sources": sources})


def _local_builder(path: str) -> tuple[str, list[str]]:
    files = [path]
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*"), recursive=True))
    for suffix, builder in LOCAL_BUILDERS.items():
        matching = [f for f in files if f.endswith(suffix)]
        if matching:
            return builder, matching
    raise ValueError(f"--dataset {path}: no {', '.join(LOCAL_BUILDERS)} file there; give one of those")


def open_text_stream(dataset: str, split: str = "train", dataset_config: str | None = None):
    """A streaming `datasets.IterableDataset` whose `state_dict()` resumes the stream exactly."""
    import datasets

    if dataset == EMBEDDED:
        return embedded_corpus()
    if os.path.exists(dataset):
        builder, files = _local_builder(dataset)
        logger.info("dataset: %d local %s file(s) under %s", len(files), builder, dataset)
        return datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=True)
    return datasets.load_dataset(dataset, dataset_config, split=split, streaming=True)


def pick_text_field(example: dict, text_field: str | None) -> str:
    """The column to read: `text_field`, else the first of `text`, `content` present in `example`."""
    wanted = (text_field,) if text_field else TEXT_FIELDS
    for name in wanted:
        if name in example:
            if not isinstance(example[name], str):
                raise ValueError(
                    f"text field {name!r} holds {type(example[name]).__name__}, not text; "
                    f"pick another with --text_field (columns: {sorted(example)})"
                )
            return name
    raise ValueError(
        f"the dataset has no text field {' or '.join(map(repr, wanted))}; its columns are "
        f"{sorted(example)}: pass one with --text_field"
    )
