"""saetron.eval: is an SAE any good, and what did it learn.

store (shards of collect.store's ActivationStore) -> metrics (reconstruction sums), features (density, top
rows) -> splice (the LM's loss with the SAE spliced in through the collector's LayerHook) -> plots,
report (self-contained HTML) -> run (evaluate(), the CLI's run()), __main__ the CLI. Kept import-free
(torch loads on first use): `from saetron.eval import evaluate` imports run.py.
"""


def __getattr__(name: str):
    if name in ("evaluate", "evaluate_reconstruction", "format_summary", "run"):
        import importlib

        # import_module, not `from . import run`: that looks `run` up on this package first, which
        # calls this __getattr__ again (endless recursion) while the submodule is not yet imported
        return getattr(importlib.import_module(f"{__name__}.run"), name)
    raise AttributeError(f"module 'saetron.eval' has no attribute {name!r}")
