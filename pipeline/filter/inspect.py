"""`python -m pipeline.filter.inspect [OUTPUT_DIR] [--rule R] [-n N]`: show rejected documents per rule.

Reads the filter stage's rejected/*.parquet (all of them, not the MLflow sample), so a person can
judge whether a threshold removes what it should.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from pipeline import PROJECT_ROOT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.filter.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage_dir", nargs="?", type=Path, default=PROJECT_ROOT / "outputs" / "demo" / "filter",
                        help="the filter stage's output (default: outputs/demo/filter)")
    parser.add_argument("--rule", action="append", default=[], help="only these rules (prefix match, repeatable), "
                                                                    "e.g. --rule gopher. --rule langid.language")
    parser.add_argument("-n", "--per-rule", type=int, default=3, help="examples per rule (default 3)")
    parser.add_argument("--chars", type=int, default=400, help="characters of text to show (default 400)")
    args = parser.parse_args(argv)

    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    files = sorted((args.stage_dir / "rejected").glob("*.parquet"))
    if not files:
        print(f"error: no rejected/*.parquet in {args.stage_dir}: run 'make filter' first", file=sys.stderr)
        return 2
    table = ds.dataset(files).to_table(columns=["rule", "value", "limit", "detail", "url", "file", "record_id",
                                                "lang", "lang_score", "text"])
    counts = table.group_by("rule").aggregate([("rule", "count")]).sort_by([("rule_count", "descending")])
    total = table.num_rows
    for rule, n in zip(counts["rule"].to_pylist(), counts["rule_count"].to_pylist()):
        if args.rule and not any(rule.startswith(r) for r in args.rule):
            continue
        print(f"\n=== {rule}: {n:,} rejected ({n / total:.1%} of rejections) ===")
        rows = table.filter(pc.equal(table["rule"], rule)).slice(0, args.per_rule).to_pylist()
        for i, r in enumerate(rows, 1):
            measured = "" if r["value"] is None else f"value {r['value']:.4g}"
            limit = "" if r["limit"] is None else f" (limit {r['limit']:.4g})"
            lang = f"  lang {r['lang']} {r['lang_score']:.2f}" if r["lang"] else ""
            print(f"--- {i}. {r['url'] or r['file']} [{r['record_id']}]  {measured}{limit}{lang}")
            if r["detail"]:
                print(f"    detail: {r['detail'][:300]}")
            text = " ".join((r["text"] or "").split())
            print(textwrap.indent(textwrap.fill(text[:args.chars] + ("…" if len(text) > args.chars else ""),
                                                width=100) or "(no text)", "    "))
    return 0


def _main() -> int:
    try:
        return main()
    except BrokenPipeError:  # piped into head
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    raise SystemExit(_main())
