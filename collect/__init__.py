"""saetron.collect: activations of one layer of a causal LM, collected into an activation store.

config (CollectConfig) -> model (truncated load, LayerHook) + data/packing (text -> windows, background
tokenizer) -> writer (pinned host buffers, writer thread) -> store (manifest.json + shards, resume checks);
collector.collect runs the loop, __main__ is the CLI. The store's format is DESIGN.md's "activation store".
Kept import-free so `python -m saetron.collect --help` answers without loading torch.
"""
