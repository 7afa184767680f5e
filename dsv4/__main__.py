"""``python -m dsv4`` runs the command line (same as the ``dsv4`` script)."""

from __future__ import annotations

from dsv4.cli import main

raise SystemExit(main())
