"""`python -m qie`: see `qie.cli`."""

from .cli import main

raise SystemExit(main())
