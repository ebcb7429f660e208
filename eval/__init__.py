"""saetron.eval: is an SAE any good, and what did it learn.

store (shards of collect.store's ActivationStore) -> metrics (reconstruction sums), features (density, top
rows) -> splice (the LM's loss with the SAE spliced in through the collector's LayerHook) -> plots,
report (self-contained HTML) -> run (evaluate(), the CLI's run()), __main__ the CLI. Kept import-free
(torch loads on first use): `from saetron.eval import evaluate` imports run.py.
"""


def __getattr__(name: str):
    if name in ("evaluate", "evaluate_reconstruction", "format_summary", "run"):
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module 'saetron.eval' has no attribute {name!r}")
