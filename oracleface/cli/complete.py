"""``oracleface complete IMAGE --mask MASK.png|center|random --checkpoint CKPT [--out OUT.png]``:
one photo completed (``oracleface.completion`` does the work; its docstring says how).
Library warnings (a lossy output format, hole pixels outside the aligned crop) are shown as
one line each."""
from __future__ import annotations

import sys
import warnings

from oracleface.cli.command import Command


def configure_parser(parser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="photo to complete (any size)")
    parser.add_argument("--mask", required=True, metavar="MASK.png|center|random",
                        help="hole: an image of the photo's size (bright = missing), center or random")
    parser.add_argument("--checkpoint", required=True, metavar="CKPT")
    parser.add_argument("--out", default=None, metavar="OUT.png",
                        help="completed photo; its extension picks the format (default: "
                             "IMAGE_completed.png; lossy formats such as .jpg change known pixels)")
    parser.add_argument("--side-by-side", metavar="PATH", default=None,
                        help="also write input | masked | output")
    parser.add_argument("--align", choices=("dlib", "face-alignment"), default=None,
                        help="align an unaligned photo with this landmark detector first")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0, help="for --mask random")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow --out / --side-by-side to replace an input file (the photo, the mask)")


def run_command(args) -> int:
    from oracleface.completion import complete_file

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            out = complete_file(args.image, args.mask, args.checkpoint, args.out, args.side_by_side,
                                args.align, args.device, args.seed, args.overwrite)
        finally:
            for warning in caught:  # one line each, not Python's two-line format
                print(f"oracleface complete: warning: {warning.message}", file=sys.stderr)
    print(f"completed image written to {out}" +
          (f"; side by side: {args.side_by_side}" if args.side_by_side else ""))
    return 0


def command() -> Command:
    return Command("complete", "complete the masked region of one photo with a trained checkpoint",
                   configure_parser, run_command)
