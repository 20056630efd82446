"""``python -m dprdm`` runs the command line."""

from dprdm.clients.cli import main

raise SystemExit(main())
