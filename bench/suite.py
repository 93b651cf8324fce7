"""``python -m bench all [--quick]``: every benchmark in turn, then one table of all figures.

Each benchmark provisions and removes its own services; one failing does not stop the rest.
The exit code is non-zero when a benchmark errors — and, with ``--strict``, when a target is
missed. ``--quick`` (small sizes, under 3 minutes on a 2-core machine) is what CI runs so
that the benchmarks cannot rot; targets are judged on full-size runs (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from functools import partial

from bench._report import REPORTED, format_table, load_line
from bench._stack import retrying_blips

# (name, module, extra arguments with --quick)
SUITE: list[tuple[str, str, list[str]]] = [
    ("fanout", "bench.fanout", ["--repeat", "2"]),
    ("throughput", "bench.throughput", []),
    ("large", "bench.large", []),
    ("metadata", "bench.metadata", []),
    ("read_api", "bench.read_api", []),
]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (CI)")
    parser.add_argument("--strict", action="store_true", help="exit non-zero when a target is missed")
    parser.add_argument("--skip", action="append", default=[], choices=[name for name, _, _ in SUITE],
                        help="leave a benchmark out (repeatable)")
    args = parser.parse_args(argv)
    outcomes: dict[str, str] = {}
    began = time.perf_counter()
    for name, module_name, quick_args in SUITE:
        if name in args.skip:
            continue
        print(f"\n=== {name} ===", flush=True)
        started = time.perf_counter()
        try:
            module = importlib.import_module(module_name)
            argv = ["--quick", *quick_args] if args.quick else []
            code: int = retrying_blips(partial(module.main, argv), what=name, attempts=2)
            outcome = "targets met" if code == 0 else "a target missed"
        except Exception:
            traceback.print_exc()
            outcome = "ERROR"
        outcomes[name] = f"{outcome} ({time.perf_counter() - started:.0f} s)"
    print("\n=== summary ===")
    if REPORTED:
        print(format_table(REPORTED))
    for name, outcome in outcomes.items():
        print(f"  {name}: {outcome}")
    print(f"total {time.perf_counter() - began:.0f} s; {load_line()}")
    if any(outcome.startswith("ERROR") for outcome in outcomes.values()):
        return 2
    if args.strict and not all(outcome.startswith("targets met") for outcome in outcomes.values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
