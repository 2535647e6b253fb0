"""``oracleface train --data DIR --out RUN_DIR``: the command line of the trainer
(``oracleface.training.trainer``), which does the work.
"""
from __future__ import annotations

import argparse

from oracleface.cli.command import Command, DeprecatedAlias
from oracleface.training.runtime import announce


def configure_parser(parser) -> None:
    """``oracleface train`` arguments. Every option defaults to "not given" so that only
    the flags on the command line override the config file (see ``oracleface.training.config``).
    The defaults quoted in the help come from ``TrainConfig``."""
    from oracleface.training.config import AMP_MODES, DEFAULTS, parse_layer_list
    from oracleface.training.runtime import MOST_DEFAULT_WORKERS

    keep = argparse.SUPPRESS
    parser.add_argument("--data", metavar="DIR", default=keep, help="folder of face images (recursive)")
    parser.add_argument("--out", metavar="RUN_DIR", default=keep,
                        help="run folder: config.yaml, checkpoints/, tensorboard/, samples/")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML file of options (names as the flags, - or _); flags override it")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT|if-any",
                        help="continue RUN_DIR/checkpoints/latest.pt (an error when there is none), "
                             "the checkpoint CKPT, or with 'if-any' latest.pt when it exists and a "
                             "fresh run otherwise")
    model = parser.add_argument_group("model")
    model.add_argument("--resolution", type=int, default=keep,
                       help=f"image side: 256 or 1024 (default {DEFAULTS.resolution})")
    model.add_argument("--attention", choices=("dsa", "ca", "none"), default=keep,
                       help=f"attention module (default: {DEFAULTS.attention}, the paper)")
    model.add_argument("--width", type=float, default=keep,
                       help=f"channel multiplier in (0, 1] (default {DEFAULTS.width:g} = the paper; smaller "
                            "for smoke runs)")
    model.add_argument("--dsa-backend", default=keep,
                       help=f"auto, reference, cpu, triton or cuda (default {DEFAULTS.dsa_backend})")
    model.add_argument("--oracle-layers", type=parse_layer_list, default=keep, metavar="12,13,14",
                       help="DSA layers with oracle supervision (default: the first, 12 at 256², the "
                            "paper's); 12,13,14 supervises every DSA layer (streamed KL, no L×L maps); "
                            "'' none")
    model.add_argument("--kl-layers", dest="oracle_layers", type=int, nargs="*", default=keep,
                       metavar="LAYER", action=DeprecatedAlias, new_flag="--oracle-layers",
                       help="deprecated: --oracle-layers as separate numbers")
    optim = parser.add_argument_group("optimisation (paper defaults)")
    optim.add_argument("--batch-size", type=int, default=keep,
                       help=f"global batch, split across processes (default {DEFAULTS.batch_size})")
    optim.add_argument("--lr-generator", type=float, default=keep,
                       help=f"RMSprop lr of G (default {DEFAULTS.lr_generator:g})")
    optim.add_argument("--lr-discriminator", type=float, default=keep,
                       help=f"RMSprop lr of the seven critics (default {DEFAULTS.lr_discriminator:g})")
    for name in ("reconstruction", "kl", "perceptual", "adversarial"):
        optim.add_argument(f"--lambda-{name}", type=float, default=keep,
                           help=f"weight of the {name} loss (default {getattr(DEFAULTS, 'lambda_' + name):g})")
    optim.add_argument("--gradient-penalty", type=float, default=keep,
                       help=f"WGAN-GP γ (default {DEFAULTS.gradient_penalty:g})")
    optim.add_argument("--no-perceptual-pretrained", dest="perceptual_pretrained", action="store_false",
                       default=keep, help="VGG-16 with random weights (smoke runs without the weights; warns)")
    optim.add_argument("--vgg-weights", metavar="FILE", default=keep,
                       help="torchvision vgg16-397923af.pth (default: $ORACLEFACE_VGG16_WEIGHTS or the "
                            "torch hub cache)")
    length = optim.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=keep, help="train until this many steps in total")
    length.add_argument("--epochs", type=int, default=keep, help="train until this many epochs in total")
    data = parser.add_argument_group("data")
    data.add_argument("--masks", default=keep,
                      help=f"random (the paper's rectangles) | center | irregular | folder:PATH "
                           f"(default {DEFAULTS.masks})")
    data.add_argument("--landmarks", default=keep,
                      help="dlib (per-image landmarks, computed once into a cache file) | "
                           "face-alignment | CACHE_FILE (from `oracleface landmarks`) | canonical "
                           f"(one template for aligned faces; warns) (default {DEFAULTS.landmarks})")
    data.add_argument("--test-size", type=float, default=keep,
                      help="held-out images: a count or a fraction (default: paper counts / 10 %%)")
    data.add_argument("--cache-dir", default=keep, help="cache of resized images")
    data.add_argument("--no-flip", dest="flip", action="store_false", default=keep,
                      help="no random horizontal flips of training images (default: flip)")
    data.add_argument("--workers", type=int, default=keep,
                      help=f"DataLoader workers per process (default: {MOST_DEFAULT_WORKERS}, at most the "
                           "CPUs this process may use, shared among torchrun's processes on the node)")
    data.add_argument("--seed", type=int, default=keep,
                      help=f"split, masks, data order, init (default {DEFAULTS.seed})")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--device", default=keep,
                         help=f"auto | cpu | cuda | cuda:N (default {DEFAULTS.device})")
    runtime.add_argument("--no-sync-bn", dest="sync_bn", action="store_false", default=keep,
                         help="under torchrun, BatchNorm statistics per process instead of over the "
                              "global batch (default: global)")
    runtime.add_argument("--amp", choices=AMP_MODES, default=keep,
                         help=f"mixed precision (default {DEFAULTS.amp})")
    runtime.add_argument("--checkpoint-every", type=int, default=keep, metavar="N",
                         help=f"default {DEFAULTS.checkpoint_every}")
    runtime.add_argument("--keep-checkpoints", type=int, default=keep, metavar="K",
                         help="numbered checkpoints kept besides latest.pt "
                              f"(default {DEFAULTS.keep_checkpoints})")
    runtime.add_argument("--sample-every", type=int, default=keep, metavar="N",
                         help=f"default {DEFAULTS.sample_every}")
    runtime.add_argument("--log-every", type=int, default=keep, metavar="N",
                         help=f"TensorBoard scalars every N steps (default {DEFAULTS.log_every})")
    runtime.add_argument("--no-progress", dest="progress", action="store_false", default=keep,
                         help="no progress bar")


NOT_CONFIG = ("config", "resume", "run", "command")


def flag_values(args) -> dict:
    """The config options given on the command line (``--test-size 5`` becomes the int 5)."""
    values = {key: value for key, value in vars(args).items() if key not in NOT_CONFIG}
    test_size = values.get("test_size")
    if isinstance(test_size, float) and test_size >= 1:
        if not test_size.is_integer():
            raise ValueError(f"--test-size must be a whole count or a fraction in (0, 1); got {test_size}")
        values["test_size"] = int(test_size)
    return values


def run_command(args) -> int:
    from oracleface.training.config import load_config_file
    from oracleface.training.trainer import train

    layers = [load_config_file(args.config)] if args.config else []
    layers.append(flag_values(args))
    summary = train(layers, resume=args.resume)
    announce(f"trained to step {summary['step']} (epoch {summary['epoch']}); "
             f"checkpoint: {summary['checkpoint']}")
    return 0


def command() -> Command:
    return Command("train", "train the face-completion model (one process, or one per GPU under torchrun)",
                   configure_parser, run_command)
