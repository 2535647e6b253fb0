"""``python -m oracleface``: the same CLI as the ``oracleface`` console script."""
import sys

from oracleface.cli import main

sys.exit(main())
