"""The ``oracleface`` command line: ``oracleface <command> ...`` (also ``python -m oracleface``).

Each subcommand is an ``oracleface.cli.command.Command`` in its own module of this package
(``landmarks``, ``train``, ``evaluate`` (``eval``), ``complete``, ``demo``):
``configure(parser)`` adds its arguments and ``run(args) -> exit status`` does the work,
importing the library (``oracleface.training``, ``oracleface.evaluation``, ...) only when
it runs; ``Command`` turns a user error into one line and exit status 2. Command modules
expose ``command()`` and never import this module; adding a subcommand is one
``register(...)`` call here; ``build_parser`` picks up everything registered, in
registration order. Only this package parses command lines (nothing else imports argparse).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from oracleface.cli.command import Command


COMMANDS: dict[str, Command] = {}


def register(command: Command) -> Command:
    """Add ``command`` to the ``oracleface`` CLI (names must be unique)."""
    if command.name in COMMANDS:
        raise ValueError(f"an oracleface subcommand named {command.name!r} is already registered")
    COMMANDS[command.name] = command
    return command


def build_parser() -> argparse.ArgumentParser:
    from oracleface import __version__

    parser = argparse.ArgumentParser(
        prog="oracleface", description="Face completion with oracle-supervised dual spatial attention.")
    parser.add_argument("--version", action="version", version=f"oracleface {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS.values():
        subparser = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.configure(subparser)
        subparser.set_defaults(run=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``oracleface`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.run(args)


def _register_commands() -> None:
    from oracleface.cli import complete, demo, evaluate, landmarks, train

    for module in (landmarks, train, evaluate, complete, demo):
        register(module.command())


_register_commands()

if __name__ == "__main__":
    sys.exit(main())
