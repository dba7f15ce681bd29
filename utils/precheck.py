"""Checks an entry script makes before torch / transformers load, so that a mistake is reported in well
under a second: input paths, the output folder, a file's schema. Standard library (and utils.records) only.

The libraries check the same things again where they read (a hub id is only known to be missing once the
hub answered); these checks only refuse what is certain without a tensor library:

* a model source that is neither an existing folder nor shaped like a hub id (``org/name``, ``name``):
  ``./nope``, ``runs/a/b``, ``nope/``; mergekit's ``base+adapter`` is checked part by part;
* a file that does not exist;
* an output folder that exists without ``--overwrite``, is a file or a link, or overlaps an input
  (utils.records.check_output_folder, the one output guard).

Use: ``return refused("merge_models.py", check)`` — runs ``check()``; a refusal prints
``<prog>: error: <one line>`` and gives 2 (the script's main returns it), else None. ``with refusals(prog):``
does the same for scripts whose main does not return a status (it exits with status 2).
"""
from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path
from typing import Iterable

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")   # utils/engine/reader.py resolves such ids on the hub


class InputError(ValueError):
    """An input the script cannot use (message names the flag and the value)."""


def is_hub_id(source: str) -> bool:
    return bool(HUB_ID.match(source)) and not source.startswith(".")


def model_source(source: str | None, flag: str, kind: str = "checkpoint folder") -> None:
    """A local folder that exists, or something shaped like a hub id (checked by the hub later)."""
    if source is None:
        return
    path = Path(source).expanduser()
    if path.is_dir():
        return
    if "+" in source:   # mergekit's base+adapter
        base, _, adapter = source.rpartition("+")
        if base and adapter:
            model_source(base, flag, kind)
            model_source(adapter, flag, "adapter folder")
            return
    if path.exists():
        raise InputError(f"{flag} {source}: expected a {kind}, found a file")
    if not is_hub_id(source):
        raise InputError(f"{flag} {source}: no such {kind} (and not a hub id)")


def model_sources(sources: Iterable[str] | None, flag: str, kind: str = "checkpoint folder") -> None:
    for source in sources or []:
        model_source(source, flag, kind)


def existing_file(path: str | None, flag: str, what: str = "file") -> None:
    if path is None:
        return
    if not Path(path).expanduser().is_file():
        raise InputError(f"{flag} {path}: no such {what}" if not Path(path).exists() else f"{flag} {path}: not a file")


def existing_folder(path: str | None, flag: str, what: str = "folder") -> None:
    if path is not None and not Path(path).expanduser().is_dir():
        raise InputError(f"{flag} {path}: no such {what}")


def output_folder(target: str | None, overwrite: bool, inputs: dict[str, str | None] | None = None,
                  role: str = "--output_dir") -> None:
    """utils.records.check_output_folder: taken (without --overwrite), a file or link, or overlapping an input."""
    if target is None:
        return
    from utils.records import check_output_folder

    check_output_folder(target, {label: path for label, path in (inputs or {}).items() if path and "+" not in path},
                        overwrite=overwrite, role=role)


def refused(prog: str, check, extra: tuple[type[BaseException], ...] = ()) -> int | None:
    """Run ``check()``: 2 after printing the refusal (InputError, an output refusal, one of `extra`), else None."""
    try:
        with refusals(prog, extra):
            check()
    except SystemExit as error:
        return int(error.code)
    return None


@contextlib.contextmanager
def refusals(prog: str, extra: tuple[type[BaseException], ...] = ()):
    """Within the block an InputError, an output refusal (utils.records) or one of `extra` is one line on
    stderr and exit status 2."""
    from utils.records import OutputExistsError, OutputRefusedError

    try:
        yield
    except (InputError, OutputExistsError, OutputRefusedError, *extra) as error:
        from utils.cli import error_line

        print(f"{prog}: error: {error_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None
