"""``oracleface demo [--out DIR] [--steps N] [--device] [--width]``: the whole pipeline on a
fresh machine, nothing downloaded (``oracleface.demo`` does the work; its docstring says what)."""
from __future__ import annotations

from oracleface.cli.command import Command


def configure_parser(parser) -> None:
    from oracleface.demo import DEFAULT_STEPS, DEFAULT_WIDTH

    parser.add_argument("--out", default="oracleface-demo", metavar="DIR",
                        help="folder for photos, run and pictures (default: ./oracleface-demo)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"training steps (default {DEFAULT_STEPS}: a few minutes on 2 CPU cores)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--width", type=float, default=DEFAULT_WIDTH,
                        help=f"channel multiplier of the demo model (default {DEFAULT_WIDTH})")


def run_command(args) -> int:
    from oracleface.demo import run_demo

    path = run_demo(args.out, args.steps, args.device, args.width)
    print(f"before/after (input | masked | output) written to {path}")
    return 0


def command() -> Command:
    return Command("demo", "train a tiny model on photos shipped with scikit-image and complete a held-out face",
                   configure_parser, run_command)
