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
        print(f"cnnvis {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"cnnvis {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
