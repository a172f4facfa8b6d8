"""`python -m pipeline.tools.inspect_sft [-n N] [--source NAME] [key=value ...]`: conversations as sft reads them.

Composes the same config as `python -m pipeline sft` (the overrides after the options), reads
sft.sources, and prints the first N conversations of each source through the chat template with
the trained tokens (the assistant's replies and their end-of-turn token) marked: green on a
terminal, [[like this]] otherwise. Each source starts with its counts: records read and skipped
as bad, conversations kept, cut to the window, or dropped.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from pipeline.config import RootConfig


def tokenizer_and_context(cfg: RootConfig) -> tuple[Path, int]:
    """The tokenizer.json of the model sft starts from, and that model's context."""
    from pipeline.contract import read_upstream
    from pipeline.errors import MissingUpstream
    from pipeline.model.io import load_pretrained

    init = cfg.sft.init
    if init.path:
        base = load_pretrained(Path(init.path), "sft.init.path")
        return base.tokenizer_json, base.model.cfg.context
    up = read_upstream(Path(cfg.paths.outputs_dir), cfg.name, init.stage)
    if "model_config" not in up.manifest["outputs"]:
        raise MissingUpstream(f"{up.dir} holds no model: sft.init.stage must be a training stage")
    return up.dir / up.manifest["outputs"]["tokenizer"], up.manifest["outputs"]["model_config"]["context"]


def inspect_sft(cfg: RootConfig, per_source: int = 2, sources: tuple[str, ...] = (),
                marks: tuple[str, str] = ("[[", "]]")) -> Iterator[str]:
    """The text to print for a run's config: a header, then each source (all, or those of ``sources``)."""
    from tokenizers import Tokenizer

    from pipeline.errors import PipelineError
    from pipeline.sft.examples import read_sources, window
    from pipeline.sft.inspect import render_examples

    s, special = cfg.sft, cfg.tokenizer.special_tokens
    unknown = sorted(set(sources) - set(s.sources))
    if unknown:
        raise PipelineError(f"--source {', '.join(unknown)}: not in sft.sources ({', '.join(s.sources)})")
    tokenizer_json, context = tokenizer_and_context(cfg)
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    read = read_sources({name: spec for name, spec in s.sources.items() if not sources or name in sources})
    max_tokens = window(s.max_tokens, context)
    on, off = marks
    yield f"template {s.template}, window {max_tokens} tokens, {tokenizer_json}; trained tokens: {on}like this{off}"
    yield from render_examples(read, tokenizer, s.template, max_tokens, special.bos, special.eos, s.drop_truncated,
                               per_source, marks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tools.inspect_sft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--per-source", type=int, default=2, help="conversations per source (default 2)")
    parser.add_argument("--source", action="append", default=[], help="only this source (repeatable)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for `python -m pipeline sft`")
    args = parser.parse_args(argv)

    from hydra.errors import HydraException

    from pipeline.config import compose
    from pipeline.errors import PipelineError

    marks = ("\x1b[32m", "\x1b[0m") if sys.stdout.isatty() else ("[[", "]]")
    try:
        for text in inspect_sft(compose(*args.overrides), args.per_source, tuple(args.source), marks):
            print(text)
    except BrokenPipeError:  # piped into head
        sys.stderr.close()
    except (PipelineError, HydraException) as e:
        cause = f": {str(e.__cause__).splitlines()[0]}" if isinstance(e, HydraException) and e.__cause__ else ""
        print(f"error: {e}{cause}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
