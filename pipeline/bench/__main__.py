"""`python -m pipeline.bench [name ...] [--quick]`: run benchmarks, print a table, write outputs/bench/<name>.json."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from pipeline import PROJECT_ROOT
from pipeline.errors import PipelineError

BENCHMARKS = {"filter_rules": "pipeline.bench.filter_rules", "filter_rethreshold": "pipeline.bench.filter_rethreshold",
              "dedup_near": "pipeline.bench.dedup_near", "dedup_memory": "pipeline.bench.dedup_memory",
              "tokenize_encode": "pipeline.bench.tokenize_encode", "pretrain_step": "pipeline.bench.pretrain_step",
              "pretrain_budget": "pipeline.bench.pretrain_budget", "sft_lora": "pipeline.bench.sft_lora",
              "dpo_lora": "pipeline.bench.dpo_lora", "energy_overhead": "pipeline.bench.energy_overhead",
              "sweep_parallel": "pipeline.bench.sweep_parallel"}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__)
    parser.add_argument("names", nargs="*", choices=[[], *BENCHMARKS], help="benchmarks to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="a small corpus, for a smoke test")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override of the demo config, e.g. -o tokenize.num_proc=1 (repeatable)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "outputs" / "bench")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], []
    for name in args.names or BENCHMARKS:
        try:
            result = importlib.import_module(BENCHMARKS[name]).run(quick=args.quick, overrides=args.override)
        except PipelineError as e:  # a missing input: say which and how to make it, then run the others
            print(f"error: {name}: {e}", file=sys.stderr)
            failed.append(name)
            continue
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        rows.append(result)
    print(f"\n{'benchmark':<18} {'baseline':>24} {'candidate':>24} {'ratio':>7} {'goal':>6}")
    for r in rows:
        b, c = r["baseline"], r["candidate"]
        unit = next(k for k in b if k not in ("name", "runs"))
        print(f"{r['name']:<18} {b[unit]:>15.3f} {unit:>8} {c[unit]:>15.3f} {unit:>8} {r['ratio']:>7.3f} "
              f"{'>=' + str(r['goal']):>6} {'ok' if r['meets_goal'] else 'BELOW GOAL'}")
        if r.get("note"):
            print(f"{'':<18} {r['note']}")
    print(f"\nwritten to {args.out}/")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
