"""``python -m dprdm`` runs the command line."""

from dprdm.cli.main import main

raise SystemExit(main())
