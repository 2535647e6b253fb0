"""What an ``oracleface`` subcommand is, and the one way every command reports a user error.
Command modules build a ``Command``; ``oracleface.cli`` collects them (so no command module
imports the CLI back)."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable

# What a command raises for bad input or a failed run (a missing or unreadable file, a full
# disk, an impossible option, a corrupt checkpoint: ``CheckpointError`` is a ValueError, a
# busy run folder: ``RunFolderBusy`` too; a non-finite training loss: ``NonFiniteLoss`` is
# a FloatingPointError): one line on stderr, exit status 2.
USER_ERRORS = (OSError, ValueError, FloatingPointError)
USER_ERROR_STATUS = 2
INTERRUPTED_STATUS = 130  # 128 + SIGINT, as shells report a Ctrl-C


@dataclass(frozen=True)
class Command:
    """``configure(parser)`` adds the subcommand's arguments; ``run(args)`` does the work and
    returns the exit status (heavy modules are imported only when it runs)."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], "int | None"]

    def __call__(self, args: argparse.Namespace) -> int:
        """Run with the shared error handling: a user error becomes
        ``oracleface NAME: error: MESSAGE`` on stderr and exit status 2, never a traceback;
        a Ctrl-C the command did not handle itself (``train`` handles the first one during
        training) becomes ``oracleface NAME: interrupted`` and exit status 130."""
        try:
            return int(self.run(args) or 0)
        except USER_ERRORS as error:
            print(f"oracleface {self.name}: error: {error}", file=sys.stderr)
            return USER_ERROR_STATUS
        except KeyboardInterrupt:
            print(f"oracleface {self.name}: interrupted", file=sys.stderr)
            return INTERRUPTED_STATUS


class DeprecatedAlias(argparse.Action):
    """An old flag that keeps working: it warns once (``warn_deprecated``) and stores its
    value into the setting of ``new_flag``."""

    def __init__(self, option_strings, dest, new_flag: str, **kwargs):
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from oracleface.training.config import warn_deprecated

        warn_deprecated(option_string, self.new_flag)
        setattr(namespace, self.dest, values)
