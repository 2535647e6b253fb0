"""``oracleface complete IMAGE --mask MASK.png|center|random --checkpoint CKPT --out OUT.png``:
one photo completed (``oracleface.completion`` does the work; its docstring says how)."""
from __future__ import annotations

from oracleface.cli.command import Command


def configure_parser(parser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="photo to complete (any size)")
    parser.add_argument("--mask", required=True, metavar="MASK.png|center|random",
                        help="hole: an image of the photo's size (bright = missing), center or random")
    parser.add_argument("--checkpoint", required=True, metavar="CKPT")
    parser.add_argument("--out", required=True, metavar="OUT.png")
    parser.add_argument("--side-by-side", metavar="PATH", default=None,
                        help="also write input | masked | output")
    parser.add_argument("--align", choices=("dlib", "face-alignment"), default=None,
                        help="align an unaligned photo with this landmark detector first")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0, help="for --mask random")


def run_command(args) -> int:
    from oracleface.completion import complete_file

    out = complete_file(args.image, args.mask, args.checkpoint, args.out, args.side_by_side,
                        args.align, args.device, args.seed)
    print(f"completed image written to {out}" +
          (f"; side by side: {args.side_by_side}" if args.side_by_side else ""))
    return 0


def command() -> Command:
    return Command("complete", "complete the masked region of one photo with a trained checkpoint",
                   configure_parser, run_command)
