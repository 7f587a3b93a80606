"""`python -m qie`: see `qie.cli.main`."""

from qie.cli.main import main

raise SystemExit(main())
