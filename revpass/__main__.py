"""``python -m revpass``: the revpass command (revpass/cli.py)."""

from revpass.cli import main

raise SystemExit(main())
