"""What an ``oracleface`` subcommand is. Command modules build one; ``oracleface.cli``
collects them (so no command module imports the CLI back)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Command:
    """``configure(parser)`` adds the subcommand's arguments; ``run(args)`` does the work and
    returns the exit status (heavy modules are imported only when it runs)."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], "int | None"]
