"""The command line: `python -m qie edit | info | plan | make-tiny | serve | bench | soak`."""

from qie.cli.main import main

__all__ = ["main"]
