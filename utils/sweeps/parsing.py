"""Check a sweep's flags with the entry script's own argparse parser, before anything is launched.

Every entry script exposes ``build_parser`` (the GLUE scripts take their config, whose defaults depend
on ``--config``). Each setting's argv is parsed by it: a flag the script does not have, a value of the
wrong type or outside its choices, a switch given a value, is reported naming the setting and the flag.
The parsed namespace (defaults included) is the setting's resolved config, recorded with its result and
compared on resume.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
from typing import Any

from utils.cli import config_path_from_argv
from utils.sweeps.spec import SweepError, flags_to_argv


class _ParseError(Exception):
    pass


def _raise(message: str):
    raise _ParseError(message)


def load_parser(module_name: str, argv: list[str]) -> argparse.ArgumentParser:
    """The script's parser for this argv (``build_parser()`` or ``build_parser(config)``)."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise SweepError(f"cannot import the entry script {module_name}.py: {error}") from error
    build = getattr(module, "build_parser", None)
    if build is None:
        raise SweepError(f"{module_name}.py has no build_parser(); the sweep cannot check its flags")
    if inspect.signature(build).parameters:
        from utils.glue.data import GlueDataError, load_glue_config

        value = config_path_from_argv(argv)
        try:
            parser = build(load_glue_config(value))
        except GlueDataError as error:
            raise SweepError(str(error)) from error
    else:
        parser = build()
    parser.error = _raise  # report instead of printing usage and exiting
    return parser


def check_flag_names(parser: argparse.ArgumentParser, flags: dict[str, Any], script: str, where: str) -> None:
    """Every flag must be one of the script's options; a switch takes true/false only."""
    actions = {option: action for action in parser._actions for option in action.option_strings}
    for name, value in flags.items():
        action = actions.get(f"--{name}")
        if action is None:
            known = sorted(option[2:] for option in actions if option.startswith("--") and option != "--help")
            raise SweepError(f"{where}: {script} has no flag --{name} (its flags: {', '.join(known)})")
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if switch and value not in (True, False, None):
            raise SweepError(f"{where}: --{name} of {script} is a switch; give true or false, not {value!r}")
        if not switch and value is True:
            raise SweepError(f"{where}: --{name} of {script} takes a value, not true")


def resolve(module_name: str, flags: dict[str, Any], where: str, parser_cache: dict | None = None) -> dict[str, Any]:
    """Parse ``flags`` with the script's parser; returns ``vars(namespace)`` as plain JSON values."""
    argv = flags_to_argv(flags)
    key = (module_name, config_path_from_argv(argv))
    cache = parser_cache if parser_cache is not None else {}
    if key not in cache:
        cache[key] = load_parser(module_name, argv)
    parser = cache[key]
    check_flag_names(parser, flags, f"{module_name}.py", where)
    try:
        namespace = parser.parse_args(argv)
    except _ParseError as error:
        raise SweepError(f"{where}: {module_name}.py rejects its flags: {error}") from error
    return json.loads(json.dumps(vars(namespace), default=str))
