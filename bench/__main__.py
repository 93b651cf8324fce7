"""``python -m bench NAME [ARGS...]``: run one benchmark, ``python -m bench`` lists them.

Each benchmark is a module with ``main(argv: list[str]) -> int``; add it to ``BENCHMARKS``.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS: dict[str, str] = {
    "read_api": "bench.read_api",
    "fanout": "bench.fanout",
    "submit": "bench.submit",
    "throughput": "bench.throughput",
    "large": "bench.large",
    "metadata": "bench.metadata",
    "all": "bench.suite",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in BENCHMARKS:
        if argv and argv[0] not in {"-h", "--help"}:
            print(f"unknown benchmark {argv[0]!r}", file=sys.stderr)
        print("usage: python -m bench NAME [ARGS...]; NAME is one of: " + ", ".join(sorted(BENCHMARKS)))
        return 0 if not argv or argv[0] in {"-h", "--help"} else 2
    module = importlib.import_module(BENCHMARKS[argv[0]])
    result: int = module.main(argv[1:])
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
