"""`python -m pipeline.sft.inspect [-n N] [--source NAME] [key=value ...]`: training conversations as the model reads them.

Composes the same config as `python -m pipeline sft` (the overrides after the options), reads
sft.sources, and prints the first N conversations of each source through the chat template with
the trained tokens (the assistant's replies and their end-of-turn token) marked: green on a
terminal, [[like this]] otherwise. Each source starts with its counts: records read and skipped
as bad, conversations kept, cut to the window, or dropped.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline import PROJECT_ROOT


def tokenizer_and_context(cfg) -> tuple[Path, int]:
    """The tokenizer.json of the model sft starts from, and that model's context."""
    from pipeline.contract import read_upstream
    from pipeline.errors import MissingUpstream
    from pipeline.stages.sft import load_path

    init = cfg.sft.init
    if init.path:
        model, tokenizer_json, _ = load_path(Path(init.path))
        return tokenizer_json, model.cfg.context
    up = read_upstream(Path(cfg.paths.outputs_dir), cfg.name, init.stage)
    if "model_config" not in up.manifest["outputs"]:
        raise MissingUpstream(f"{up.dir} holds no model: sft.init.stage must be a training stage")
    return up.dir / up.manifest["outputs"]["tokenizer"], up.manifest["outputs"]["model_config"]["context"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.sft.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--per-source", type=int, default=2, help="conversations per source (default 2)")
    parser.add_argument("--source", action="append", default=[], help="only this source (repeatable)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for `python -m pipeline sft`")
    args = parser.parse_args(argv)

    from hydra import compose, initialize_config_dir
    from tokenizers import Tokenizer

    from pipeline import config  # noqa: F401  registers the schema and the ${root:} resolver
    from pipeline.config import SftConfig, typed, validate
    from pipeline.errors import PipelineError
    from pipeline.sft.chat import encode_all, render_masked
    from pipeline.stages.sft import read_sources

    try:
        with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=args.overrides)
        validate(cfg)
        spec = typed(cfg.sft, SftConfig, "sft")
        tokenizer_json, context = tokenizer_and_context(cfg)
        tokenizer = Tokenizer.from_file(str(tokenizer_json))
        unknown = sorted(set(args.source) - set(cfg.sft.sources))
        if unknown:
            raise PipelineError(f"--source {', '.join(unknown)}: not in sft.sources ({', '.join(cfg.sft.sources)})")
        read, _ = read_sources(cfg)
        max_tokens = min(spec.max_tokens or context, context)
        special = cfg.tokenizer.special_tokens
        on, off = ("\x1b[32m", "\x1b[0m") if sys.stdout.isatty() else ("[[", "]]")
        print(f"template {spec.template}, window {max_tokens} tokens, {tokenizer_json}; trained tokens: "
              f"{on}like this{off}")
        for name, result in read.items():
            if args.source and name not in args.source:
                continue
            examples, counts = encode_all(result.conversations, tokenizer, spec.template, max_tokens, special.bos,
                                          special.eos, spec.drop_truncated)
            bad = ", ".join(f"{k} {v}" for k, v in sorted(result.bad.items())) or "none"
            print(f"\n=== {name}: {len(result.conversations):,} conversations read, bad records: {bad}")
            print(f"    encoded: {json.dumps(counts)}")
            for example in examples[:args.per_source]:
                trained = sum(label != -100 for label in example.labels)
                cut = ", cut to the window" if example.truncated else ""
                print(f"--- {example.id}: {len(example.ids)} tokens, {trained} trained{cut}")
                print(render_masked(tokenizer, example, on, off))
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _main() -> int:
    try:
        return main()
    except BrokenPipeError:  # piped into head
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(_main())
