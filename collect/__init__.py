"""saetron.collect: activations of one or several hook sites of a causal LM, collected into activation stores.

config (CollectConfig) -> model (truncated load, LayerHook) + data/packing (text -> windows, background
tokenizer) -> writer (batch slots, pinned host buffers, writer thread) -> store (manifest.json + shards
written as rows arrive, float8 rows in fp8.py, resume checks);
collector.collect runs the loop, __main__ is the CLI. The store's format is DESIGN.md's "activation store".
Kept import-free so `python -m saetron.collect --help` answers without loading torch.
"""
