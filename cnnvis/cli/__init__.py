"""The ``cnnvis`` command line.

Every module of this package that defines ``register(subparsers)`` contributes subcommands; each
subcommand sets ``func(args) -> int``. Heavy imports happen inside those functions, so ``cnnvis
--help`` stays fast.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import pkgutil
import re
import sys

from ..errors import CnnvisError

INTERRUPTED = 130  # exit code after Ctrl-C (128 + SIGINT)


class _Parser(argparse.ArgumentParser):
    """argparse with errors in one line (``cnnvis <command>: error: ...``, exit 2), like every other
    user error; ``--help`` still shows the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from .common import memory_size

    parser = _Parser(
        prog="cnnvis", description="See what a convolutional network does inside.")
    parser.add_argument("--version", action="version", version=f"cnnvis {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    modules = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "common":
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(mod, "register"):
            modules.append(mod)
    for mod in sorted(modules, key=lambda m: (getattr(m, "ORDER", 50), m.__name__)):
        mod.register(sub)
    for command in {id(p): p for p in sub.choices.values()}.values():
        command.add_argument("--memory-limit", type=memory_size, default=None, metavar="SIZE",
                             help="memory budget checked before large allocations, e.g. 4G "
                                  "(default: $CNNVIS_MEMORY_LIMIT, else half the RAM)")
    return parser


def flag_message(exc: CnnvisError, parser: argparse.ArgumentParser, command: str) -> str:
    """``exc``'s message as the CLI prints it: each library parameter it names (``method='x'``,
    listed in ``exc.params``) becomes the flag of ``command`` that sets it (``--method 'x'``;
    ``show=True`` of a switch becomes ``--show``). The one place where parameters meet flags: a
    parameter is the flag whose ``dest`` has its name; one the command lacks stays as it is."""
    text = str(exc)
    if not exc.params:
        return text
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    for param in exc.params:
        action = next((a for a in sub._actions if a.dest == param and a.option_strings), None)
        if action is None:
            continue
        flag = max(action.option_strings, key=len)  # --layer, not -l
        if isinstance(action, argparse._StoreTrueAction):
            text = re.sub(rf"\b{re.escape(param)}=True\b", flag, text)
        text = re.sub(rf"(?<![\w-]){re.escape(param)}=", flag + " ", text)
    return text


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a refused argument (2, said in one line) or --help/--version (0)
        return exc.code if isinstance(exc.code, int) else 2
    from .. import limits

    try:
        if getattr(args, "images", None) and getattr(args, "input_array", None):
            raise CnnvisError("--input-array: give either images or --input-array, not both")
        # --memory-limit holds for this command (and the steps run-all runs within it)
        with limits.memory_limit_set(args.memory_limit) if args.memory_limit else contextlib.nullcontext():
            return int(args.func(args) or 0)
    except CnnvisError as exc:
        if debug:
            raise
        print(f"cnnvis {args.command}: error: {flag_message(exc, parser, args.command)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"cnnvis {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
