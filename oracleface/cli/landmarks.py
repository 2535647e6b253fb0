"""``oracleface landmarks DATA_DIR``: 68-point landmarks of every image, once, into a
resumable cache file (``oracleface.data.landmarks.build_landmark_cache`` does the work)."""
from __future__ import annotations

from oracleface.cli.command import Command


def configure_parser(parser) -> None:
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


def run_command(args) -> int:
    from oracleface.data.landmarks import build_landmark_cache

    summary = build_landmark_cache(args.data_dir, provider=args.provider, out=args.out, size=args.size,
                                   flush_every=args.flush_every, progress=not args.quiet)
    print(f"{summary['path']}: {summary['total']} images, {summary['computed']} computed now, "
          f"{summary['skipped']} already done; no face detected (canonical landmarks used): "
          f"{summary['no_face']}; unreadable: {summary['unreadable']}")
    return 0


def command() -> Command:
    return Command("landmarks", "compute 68-point landmarks for every image once, into a resumable cache file",
                   configure_parser, run_command)
