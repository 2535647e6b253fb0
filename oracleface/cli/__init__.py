"""The ``oracleface`` command line: ``oracleface <command> ...`` (also ``python -m oracleface``).

Each subcommand is an ``oracleface.command.Command``: ``configure(parser)`` adds its
arguments and ``run(args) -> exit status`` does the work, importing heavy modules only
when it runs. Command modules expose ``command()`` and never import this module; adding
a subcommand is one ``register(...)`` call here; ``build_parser`` picks up everything
registered, in registration order.
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
        subparser.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``oracleface`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


# ----------------------------------------------------------------------------- landmarks

def _configure_landmarks(parser: argparse.ArgumentParser) -> None:
    from oracleface.data.landmarks import PROVIDERS

    parser.add_argument("data_dir", metavar="DATA_DIR", help="folder of face images (searched recursively)")
    parser.add_argument("--provider", default="dlib", choices=sorted(PROVIDERS),
                        help="landmark detector (default: dlib, offline)")
    parser.add_argument("--out", metavar="CACHE_FILE", default=None,
                        help="cache file (default: DATA_DIR/landmarks_<provider>.json)")
    parser.add_argument("--size", type=int, default=512,
                        help="side the images are resized to before detection (default: 512)")
    parser.add_argument("--flush-every", type=int, default=200, metavar="N",
                        help="rewrite the cache file every N images (default: 200)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_landmarks(args: argparse.Namespace) -> int:
    from oracleface.data.landmarks import build_landmark_cache

    summary = build_landmark_cache(args.data_dir, provider=args.provider, out=args.out, size=args.size,
                                   flush_every=args.flush_every, progress=not args.quiet)
    print(f"{summary['path']}: {summary['total']} images, {summary['computed']} computed now, "
          f"{summary['skipped']} already done; no face detected (canonical landmarks used): "
          f"{summary['no_face']}; unreadable: {summary['unreadable']}")
    return 0


register(Command("landmarks", "compute 68-point landmarks for every image once, into a resumable cache file",
                 _configure_landmarks, _run_landmarks))



# ----------------------------------------------------------------------------- train, eval, complete, demo
def _register_pipeline_commands() -> None:
    from oracleface import completion, demo, evaluation
    from oracleface.cli import train

    for module in (train, evaluation, completion, demo):
        register(module.command())


_register_pipeline_commands()

if __name__ == "__main__":
    sys.exit(main())
