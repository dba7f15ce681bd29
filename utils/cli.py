"""Command-line pieces every entry script shares, declared once: the help formatter, the paper's DARE
flags and their conversion to DareOptions, device resolution and seeding.

Scripts parse with these, convert to dataclasses here, and pass only dataclasses to the libraries.
"""
from __future__ import annotations

import argparse
import contextlib
import random
import signal
import sys
import threading

SUPPRESSED_DEFAULTS = (None, False, argparse.SUPPRESS)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks; shows a flag's default once, and only when it says something
    (not for None/False defaults, nor when the help text already states it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        # identity, not ==: a default of 0 or 0.0 says something (0 == False)
        empty = isinstance(action.default, (list, tuple)) and not action.default
        if any(action.default is hidden for hidden in SUPPRESSED_DEFAULTS) or empty \
                or "(default" in (action.help or "") or action.help is None:
            return action.help or ""
        return super()._get_help_string(action)


class Terminated(KeyboardInterrupt):
    """A termination signal (SIGTERM: what job schedulers send), raised in the main thread like Ctrl-C's
    KeyboardInterrupt so that the same cleanups run (staging folders removed)."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block SIGTERM raises Terminated in the main thread (an entry script's main wraps its work
    in it); the previous handler is restored after. Elsewhere than the main thread it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def warnings_to_stderr(prog: str, logger_name: str):
    """Within the block, a library logger's warnings print as ``<prog>: warning: ...`` lines on stderr
    (once: not also propagated to the root logger)."""
    import logging
    import sys

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: warning: %(message)s"))
    handler.setLevel(logging.WARNING)
    library = logging.getLogger(logger_name)
    library.addHandler(handler)
    propagate, library.propagate = library.propagate, False
    try:
        yield
    finally:
        library.removeHandler(handler)
        library.propagate = propagate


ERROR_LINE_LIMIT = 2000


def error_line(error: object, limit: int = ERROR_LINE_LIMIT) -> str:
    """An error message as one line of at most `limit` characters: line breaks become spaces and the middle
    of a longer text is cut (a hostile input echoed in a message, e.g. a YAML 'billion laughs' value, must
    not print megabytes)."""
    text = " ".join(str(error).split("\n"))
    if len(text) <= limit:
        return text
    half = (limit - 40) // 2
    return f"{text[:half]} ... [{len(text) - 2 * half} characters cut] ... {text[-half:]}"


def interrupt_reason(error: KeyboardInterrupt) -> str:
    """'Ctrl-C', or 'terminated by signal N' (an exception is always true: test its text, not the object)."""
    return str(error) or "Ctrl-C"


def interrupted_status(error: KeyboardInterrupt) -> int:
    """The shell's exit status of a process ended by this signal: 128 + its number (130 Ctrl-C, 143 SIGTERM)."""
    return 128 + getattr(error, "signum", signal.SIGINT)


def run_entry(prog: str, work, user_errors: tuple[type[BaseException], ...], output: str) -> int:
    """Run an entry script's `work()` (returning its exit status) the way every writing script reports:
    a user error (`user_errors`, or the file system refusing: read-only, full, permissions) is one line on
    stderr and status 2; Ctrl-C / SIGTERM is one line and 130 / 143. Nothing is half-written in either case
    (outputs are published by utils/records.write_folder_atomic). Anything else is a bug: its traceback stays."""
    from utils.engine.writer import NonFiniteOutputError
    from utils.records import OutputRefusedError

    try:
        with sigterm_as_interrupt():
            return work()
    except (*user_errors, OutputRefusedError, NonFiniteOutputError) as error:
        print(f"{prog}: error: {error_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"{prog}: error: {error_line(error.strerror or error)}"
              f"{f': {error_line(error.filename)}' if error.filename else ''}; nothing was written", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:
        print(f"{prog}: interrupted ({interrupt_reason(error)}); nothing was written to {output}", file=sys.stderr)
        return interrupted_status(error)


def config_path_from_argv(argv) -> str | None:
    """The value of ``--config`` in ``argv`` (sys.argv[1:] when None), read before parsing: some parsers'
    defaults come from that file."""
    tokens = list(sys.argv[1:] if argv is None else argv)
    for index, token in enumerate(tokens):
        if token == "--config" and index + 1 < len(tokens):
            return tokens[index + 1]
        if token.startswith("--config="):
            return token.split("=", 1)[1]
    return None


def positive_float(value: str) -> float:
    """argparse type of a size or a rate that must be finite and > 0 (nan and inf refused)."""
    import math

    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be finite, got {value}")
    return number


def finite_float(value: str) -> float:
    """argparse type of a weight or coefficient: any finite number (nan and inf refused)."""
    import math

    number = float(value)
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be finite, got {value}")
    return number


def drop_rate(value: str) -> float:
    """argparse type of a DARE drop rate: a float in [0, 1) (p = 1 would divide by 1 − p = 0)."""
    rate = float(value)
    if not 0.0 <= rate < 1.0:
        raise argparse.ArgumentTypeError(f"drop rate must be in [0, 1), got {value}")
    return rate


def add_dare_arguments(parser: argparse.ArgumentParser) -> None:
    """The paper's DARE flags (names as in MergeLM); --weight_mask_rate defaults to 0 (the models as they are)."""
    parser.add_argument("--weight_format", choices=["delta_weight", "finetuned_weight"], default="delta_weight",
                        help="what DARE drops: the delta θ_ft − θ_pre, or θ_ft itself")
    parser.add_argument("--weight_mask_rate", type=drop_rate, default=0.0,
                        help="DARE drop rate p in [0, 1) (0 = the models as they are)")
    parser.add_argument("--use_weight_rescale", action="store_true",
                        help="divide kept entries by 1 − p (DARE); without it: DropOnly")
    parser.add_argument("--mask_strategy", choices=["random", "magnitude"], default="random",
                        help="random: Bernoulli(p) drop; magnitude: drop the smallest |x|")
    parser.add_argument("--magnitude_rule", choices=["exact_count", "original"], default="exact_count",
                        help="magnitude only, k = int(n·p): exact_count drops exactly k entries; original (MergeLM) drops "
                             "every |x| ≤ the k-th smallest |x| (all ties at the threshold, so more than k on repeated values)")


def dare_options_from_args(args: argparse.Namespace):
    """DareOptions from the flags of add_dare_arguments (already range-checked by the parser)."""
    from model_merging_methods import DareOptions

    return DareOptions(drop_rate=args.weight_mask_rate, rescale=args.use_weight_rescale,
                       strategy=args.mask_strategy, weight_format=args.weight_format, magnitude_rule=args.magnitude_rule)


def dare_suffix(options, *, always_rescale: bool = False, searched_rate: bool = False) -> str:
    """The original's result-name suffix of a DARE setting: ``_mask_<p>_rescale_<bool>`` (nothing at p = 0
    unless `always_rescale`), then ``_strategy_magnitude`` (plus ``_magnitude_rule_original`` for that rule) and
    ``_weight_format_finetuned_weight`` when set.

    `searched_rate`: the rate is a searched grid axis named per setting (GLUE merge search), so it is left
    out, and rescaling (DARE's default) is named only when off (``_rescale_False``)."""
    if searched_rate:
        name = "" if options.rescale else "_rescale_False"
    elif options.drop_rate == 0.0 and not always_rescale:
        return f"_mask_{options.drop_rate}"
    else:
        name = f"_mask_{options.drop_rate}_rescale_{options.rescale}"
    if options.strategy == "magnitude":
        name += f"_strategy_{options.strategy}"
        name += "_magnitude_rule_original" if options.magnitude_rule == "original" else ""
    if options.weight_format == "finetuned_weight":
        name += f"_weight_format_{options.weight_format}"
    return name


def resolve_device(device: str | None, gpu: int | None = None):
    """``--device`` (cpu, cuda, cuda:N, auto) or the paper's ``--gpu N``; auto = cuda:0 if available.

    An unknown device string or CUDA requested without CUDA raises ValueError (a user error)."""
    import torch

    if device in (None, "auto"):
        if gpu is not None:
            return torch.device(f"cuda:{gpu}" if gpu >= 0 and torch.cuda.is_available() else "cpu")
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown device {device!r} (use cpu, cuda, cuda:N or auto)") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' requested but CUDA is not available")
    return resolved


def set_random_seed(seed: int) -> None:
    """Seed python ``random``, numpy and torch (CPU and CUDA)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
