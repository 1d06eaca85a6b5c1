"""The ``hfx`` command: ``hfx bench tuners|trainers|speed [...]`` (see :mod:`hfx.bench`)."""

from __future__ import annotations

import argparse
import sys

BENCHES = {
    "tuners": "hfx.bench.tuners",
    "trainers": "hfx.bench.trainers",
    "speed": "hfx.bench.speed",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="hfx", description="hfx command line")
    sub = p.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="compare methods on the built-in task (JSON, Markdown, plots)")
    bench.add_argument("what", choices=list(BENCHES), help="tuners | trainers | speed")
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHES:
        import importlib

        importlib.import_module(BENCHES[argv[1]]).main(argv[2:])  # each bench parses its own options
        return
    p.parse_args(argv)  # prints usage / the error for anything else


if __name__ == "__main__":
    main()
