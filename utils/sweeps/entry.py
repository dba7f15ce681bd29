"""``python -m utils.sweeps.entry <module> <argv...>``: import an entry script and call its ``main(argv)``.

The process's exit status is the script's: its SystemExit code (2 for bad input), 1 for an uncaught
exception (whose traceback is printed), main's return value when it is an int, else 0.
"""
from __future__ import annotations

import importlib
import sys


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m utils.sweeps.entry MODULE [ARGV...]")
    module = importlib.import_module(sys.argv[1])
    result = module.main(sys.argv[2:])
    sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)


if __name__ == "__main__":
    main()
