"""``python -m utils.sweeps.entry <module> <argv...>``: import an entry script and call its ``main(argv)``.

The process's exit status is the script's: its SystemExit code (2 for bad input), 1 for an uncaught
exception (whose traceback is printed), 130 after SIGINT (one line, no traceback: the sweep driver stops a
setting that way), main's return value when it is an int, else 0.
"""
from __future__ import annotations

import importlib
import sys


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m utils.sweeps.entry MODULE [ARGV...]")
    try:
        module = importlib.import_module(sys.argv[1])
        result = module.main(sys.argv[2:])
    except KeyboardInterrupt:
        # the driver forwards SIGINT to stop a setting: a stop, not a bug, so one line and no traceback
        print(f"{sys.argv[1]}: interrupted (SIGINT)", file=sys.stderr)
        sys.exit(130)
    sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)


if __name__ == "__main__":
    main()
