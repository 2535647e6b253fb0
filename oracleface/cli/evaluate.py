"""``oracleface eval --data DIR --checkpoint CKPT --masks random|center``: the paper's metrics
of a checkpoint on the run's held-out split (``oracleface.evaluation`` does the work)."""
from __future__ import annotations

from oracleface.cli.command import Command


def configure_parser(parser) -> None:
    from oracleface.evaluation import DEFAULT_LPIPS_NET, LPIPS_BACKBONES, MASK_CHOICES

    parser.add_argument("--data", metavar="DIR", required=True, help="the dataset folder used in training")
    parser.add_argument("--checkpoint", metavar="CKPT", required=True, help="a training checkpoint")
    parser.add_argument("--masks", choices=MASK_CHOICES, default="random",
                        help="random rectangles (default) or the 128×128 centre hole")
    parser.add_argument("--out", metavar="metrics.json", default=None, help="also write the results as JSON")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N test images")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--lpips-net", choices=sorted(LPIPS_BACKBONES), default=DEFAULT_LPIPS_NET,
                        help="LPIPS backbone (default: alex, the LPIPS authors' default); its torchvision "
                             "weights must be in the torch hub cache")
    parser.add_argument("--test-list", metavar="SPLIT_JSON", default=None,
                        help="the run's held-out files (default: RUN_DIR/split.json beside the checkpoint)")


def run_command(args) -> int:
    from oracleface.evaluation import format_table, run_evaluation
    from oracleface.common import write_json_atomic

    results = run_evaluation(args.data, args.checkpoint, args.masks, args.batch_size, args.device,
                             args.limit, args.progress, args.test_list, args.lpips_net)
    print(format_table(results))
    if args.out:
        write_json_atomic(results, args.out)
        print(f"metrics written to {args.out}")
    return 0


def command() -> Command:
    return Command("eval", "L1, PSNR, SSIM and LPIPS of a checkpoint on the held-out split",
                   configure_parser, run_command)
