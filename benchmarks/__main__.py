"""Run the benchmarks and print their figures (``python -m benchmarks --help``)."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name[len("bench_") :] for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(available())})")
    parser.add_argument("--quick", action="store_true", help="smaller inputs, for a smoke run")
    parser.add_argument("--json", metavar="FILE", help="also write all figures to FILE")
    args = parser.parse_args(argv)
    names = args.names or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {available()}")
    results = {}
    for name in names:
        mod = importlib.import_module(f"benchmarks.bench_{name}")
        print(f"== {name}: {mod.DESCRIPTION}", flush=True)
        start = time.perf_counter()
        figures = mod.run(quick=args.quick)
        figures["wall_s"] = round(time.perf_counter() - start, 2)
        results[name] = figures
        for key, value in figures.items():
            print(f"   {key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
