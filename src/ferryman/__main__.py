"""``python -m ferryman`` runs the command-line interface."""

from ferryman.cli.main import main

raise SystemExit(main())
